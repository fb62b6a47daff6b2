"""Adapted linear layers that read one input, run as one fused step.

An attention block calls its q, k and v projections one after another on one tensor; an MLP
its gate and up projections. When each holds one active LoRA-style adapter, the first call
computes all of them with `loralab.fused_lora.lora_linears` (one stacked x Aᵀ, one A gradient,
one input gradient) and the others are handed their outputs when the model calls them.

Which layers share their input is learned, not assumed from names: the candidates are the
adapted layers under one parent module with one input width (o_proj sits beside q, k and v but
reads the attention output), and the group watches their calls until it has seen a run of
them on one tensor. If the model later calls them otherwise — another input for a member,
another order, a member skipped — the group stops for good and every layer runs on its own:
a missed speed-up, never a wrong output. Outputs are handed over only for the same tensor at
the same version, in the same autocast mode and thread, with every member's weights and
adapter parameters unchanged since they were computed (the parameters themselves: a variant's
factors may be formed from them afresh each call, as SoRA's gated B is).

Only where gradients are recorded: the gain is in the backward (one A gradient and one input
gradient for the group), and without one the stacked product does not pay for its bookkeeping.
The group also stays out of the way where that bookkeeping could not be followed: under
torch.compile or tracing, for tensor subclasses and inference tensors, and while saved-tensor
hooks are set (activation checkpointing must see the same saved tensors when it recomputes a
forward).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from loralab.fused_lora import lora_linear, lora_linears

if TYPE_CHECKING:
    from loralab.layers import AdaptedLayer

LOOKS = 8  # calls that show no shared input before a group gives up learning


def _top_saved_tensor_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False)


def _can_group(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not torch.is_grad_enabled():
        return False  # (compiling first: Dynamo would break its graph on the checks below)
    return type(x) is torch.Tensor and not x.is_inference() and _top_saved_tensor_hooks() is None


def _mode(x: torch.Tensor) -> tuple:
    """What must match between computing a sibling's output and handing it over (besides x itself)."""
    return x._version, torch.is_autocast_enabled(x.device.type), threading.get_ident()


class SiblingGroup:
    """Candidate layers under one parent; `members` once learned (see the module docstring)."""

    def __init__(self, layers: list[AdaptedLayer]) -> None:
        self.candidates = tuple(layers)
        self.members: tuple[AdaptedLayer, ...] | None = None
        self.stopped = False
        self._looks = 0
        self.clear()

    def clear(self) -> None:
        """Forget what is in flight (outputs handed over, calls being watched): adapters changed."""
        self._seen: list[AdaptedLayer] = []
        self._seen_at: tuple | None = None
        self._stash: dict[AdaptedLayer, torch.Tensor] = {}
        self._stash_at: tuple | None = None
        self._stash_versions: list[tuple[torch.Tensor, int]] = []  # (a state tensor of a member, its version then)

    def __getstate__(self) -> dict:  # copies and pickles carry what was learned, nothing in flight
        state = dict(self.__dict__)
        for key in ("_seen", "_seen_at", "_stash", "_stash_at", "_stash_versions"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.clear()

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output when the group computes or has computed it; None: the layer's own path."""
        if self.stopped or not _can_group(x):
            return None
        at = (weakref.ref(x), _mode(x))
        if self.members is None:
            self._learn(layer, at)
            return None
        if layer not in self.members:
            return None
        if layer is self.members[0]:
            if self._stash:  # the last outputs were never asked for
                self._stop()
                return None
            return self._compute(x, at)
        if not self._stash:
            return None
        if not self._same(at, self._stash_at) or layer not in self._stash or any(
                f._version != v for f, v in self._stash_versions):
            self._stop()
            return None
        return self._stash.pop(layer)

    @staticmethod
    def _same(at: tuple, other: tuple | None) -> bool:
        return other is not None and other[0]() is at[0]() and other[1] == at[1]

    def _learn(self, layer: AdaptedLayer, at: tuple) -> None:
        if self._same(at, self._seen_at) and layer not in self._seen:
            self._seen.append(layer)
            if len(self._seen) == len(self.candidates):  # nobody else could join
                self.members = tuple(self._seen)
                self.clear()
            return
        if len(self._seen) >= 2:
            self.members = tuple(self._seen)
            self.clear()
            return
        self._looks += 1
        if self._looks > LOOKS:
            self._stop()
            return
        self._seen, self._seen_at = [layer], at

    def _compute(self, x: torch.Tensor, at: tuple) -> torch.Tensor | None:
        terms = [m.fused_terms(x) for m in self.members]
        own = terms[0]
        if own is None:
            return None
        if any(t is None or t.dropout is not None for t in terms):  # each member's own dropout: apart
            return lora_linear(x, own)
        outs = lora_linears(x, terms)
        self._stash = dict(zip(self.members[1:], outs[1:]))
        self._stash_at = at
        self._stash_versions = [(f, f._version) for m in self.members[1:] for f in m.state_tensors()]
        return outs[0]

    def _stop(self) -> None:
        self.stopped = True
        self.clear()


def _groups(model: nn.Module) -> Iterator[list[AdaptedLayer]]:
    from loralab.layers import AdaptedLayer

    for parent in model.modules():
        by_width: dict[tuple, list[AdaptedLayer]] = {}
        for child in parent.children():
            if isinstance(child, AdaptedLayer) and child.kind.name in ("linear", "hf-conv1d"):
                by_width.setdefault((child.kind.name, child.kind.in_features), []).append(child)
        yield from (layers for layers in by_width.values() if len(layers) >= 2)


def link_siblings(model: nn.Module) -> None:
    """Give every adapted linear layer its group of candidate siblings (or none), learning afresh."""
    from loralab.layers import AdaptedLayer

    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            module.siblings = None
    for layers in _groups(model):
        group = SiblingGroup(layers)
        for layer in layers:
            layer.siblings = group
