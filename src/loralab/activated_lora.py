"""Activated LoRA (aLoRA, Greenewald et al., arXiv 2504.12397): the adapter acts only from the last occurrence of
its invocation token sequence on, so every token before it runs through the base model alone, whose KV
cache the adapter can then reuse. HF PEFT's `LoraConfig(alora_invocation_tokens=[...])`, here LoRA's option
`alora_invocation_tokens` (linear layers, method "lora").

The start is found per row in each forward's `input_ids`, as PEFT finds it: a row's offset is the number of
its tokens from the invocation's start to the end of the input (0 where the sequence is absent: that row
is the base model's), and in each layer the update is added to the last `offset` positions of its output.
In generation the prompt's offsets are kept for the steps that follow on the same KV cache (each new token
comes after the invocation, or the row stays the base's), as PEFT's generate passes them on. A forward
with `inputs_embeds` and no `input_ids` cannot be searched: it runs as the base model, with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def invocation_offsets(ids: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """[batch] tokens from the last occurrence of `tokens` in each row of `ids` [batch, T] to its end; 0 where
    there is none."""
    n, length = len(tokens), ids.shape[-1]
    if length < n:
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    windows = ids.unfold(-1, n, 1)  # [batch, T − n + 1, n]
    hit = (windows == torch.tensor(list(tokens), dtype=ids.dtype, device=ids.device)).all(-1)
    last_start = (length - n) - hit.flip(-1).to(torch.int8).argmax(-1)
    return torch.where(hit.any(-1), length - last_start, 0)


def activation_mask(offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """[batch, T, 1] (or [batch, 1] for one token a row): where the update counts in a layer output `out`."""
    length = out.shape[1] if out.dim() == 3 else 1
    positions = torch.arange(length, device=out.device)
    mask = positions >= length - offsets.to(out.device).unsqueeze(1)
    return mask.unsqueeze(-1) if out.dim() == 3 else mask


class Activation:
    """One aLoRA adapter's per-row offsets in the model's latest forward, read by its layers. They are kept
    after the forward, for blocks that activation checkpointing computes again in the backward."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self.offsets: torch.Tensor | None = None  # None before the model's first forward: the base alone
        self._by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def start(self, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (transformers' name for it, new and old)
        kept = self._kept(cache)
        if kept is not None and _cached_length(cache) > 0:
            self.offsets = kept  # a later step of a generation: the prompt's rows
            return
        if ids is None:
            warnings.warn("activated LoRA finds its invocation tokens in input_ids; this forward has none (only "
                          "inputs_embeds), so it runs as the base model", stacklevel=4)
            self.offsets = None
            return
        self.offsets = invocation_offsets(ids if ids.dim() == 2 else ids.unsqueeze(0), self.tokens)
        if cache is not None:  # (a cache that takes no weak reference, a legacy tuple, is not reused either)
            with contextlib.suppress(TypeError):
                self._by_cache[cache] = self.offsets

    def _kept(self, cache: Any) -> torch.Tensor | None:
        try:
            return None if cache is None else self._by_cache.get(cache)
        except TypeError:
            return None


def _cached_length(cache: Any) -> int:
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def attach(model: nn.Module, methods: Sequence[Any], tokens: Sequence[int]) -> list[Any]:
    """Give one adapter's layers (`methods`) an Activation for `tokens`, and `model` the hook that sets its
    offsets at each of its forwards; returns the hook's handle in a list."""
    activation = Activation(tokens)
    for method in methods:
        method.activation = activation

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        activation.start(args, kwargs)

    return [model.register_forward_pre_hook(before, with_kwargs=True)]


def check_tokens(tokens: Any) -> list[int]:
    if not isinstance(tokens, list | tuple) or not tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise ValueError(f"option alora_invocation_tokens must be a non-empty list of token ids (the tokenized "
                         f"invocation string), got {tokens!r}")
    return list(tokens)
