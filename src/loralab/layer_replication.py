"""Replicated base layers with shared weights, each copy adapted on its own (HF PEFT's `layer_replication`).

`AdapterSpec(layer_replication=[[0, 4], [2, 5]])` rebuilds a transformer's block list from ranges
[start, end) of its blocks: blocks 0…4 become 0, 1, 2, 3, 2, 3, 4. The copies share the original's
parameters (no memory for weights), and each gets adapters of its own, so a model grows in depth
for the cost of its adapters alone, as LLaMA Pro (arXiv 2401.02415) grows one by block expansion.
The block list is found as PEFT finds it (`model(.model)*.layers`, a BERT's `encoder.layer`,
Falcon's and GPT-2's `h`), and each copy's `layer_idx` (the KV-cache slot) and the config's
`num_hidden_layers` (and per-block `layer_types`) follow the new order, so generation works.
Module names, and so an adapter file's keys, use the new indices, as PEFT's do.

Every adapter on a model holds the same replication: it is made by the first adapter that asks
for it, and undone when the last adapter holding it is removed. Merging is refused, as in PEFT:
a weight is shared by its copies, which have different adapters.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

Ranges = list[list[int]]


@dataclass
class Replication:
    """A replication in force: its ranges and what it replaced (restored when it is undone)."""

    ranges: Ranges
    model: nn.Module  # the innermost model (its config counts the blocks)
    owner: nn.Module
    attr: str
    original: nn.ModuleList
    config: dict[str, Any]


def block_list(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(the innermost model, the module holding its list of blocks, that attribute), located as PEFT locates
    them."""
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    inner = getattr(inner, "bert", inner)
    for owner, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return inner, owner, attr
    raise ValueError(f"layer_replication needs the model's list of blocks, as PEFT finds it: an nn.ModuleList at "
                     f"(.model)*.layers (Llama-like), .encoder.layer (BERT-like) or .h (Falcon, GPT-2); "
                     f"{type(model).__name__} has none")


def _shared_copy(block: nn.Module) -> nn.Module:
    """A deep copy of `block` whose parameters are the original's own tensors."""
    return copy.deepcopy(block, memo={id(p): p for p in block.parameters()})


def replicate(model: nn.Module, ranges: Ranges) -> Replication:
    """Replace the model's block list by copies of the blocks in `ranges`, sharing their weights."""
    inner, owner, attr = block_list(model)
    original = getattr(owner, attr)
    n = len(original)
    for start, end in ranges:
        if not 0 <= start < end <= n:
            raise ValueError(f"layer_replication range [{start}, {end}) does not fit the model's {n} blocks: each "
                             f"range is [start, end) with 0 <= start < end <= {n}")
    order = [i for start, end in ranges for i in range(start, end)]
    blocks = []
    for new_index, i in enumerate(order):
        block = _shared_copy(original[i])
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
        blocks.append(block)
    config = getattr(inner, "config", None)
    saved: dict[str, Any] = {}
    if config is not None:
        if hasattr(config, "num_hidden_layers"):
            saved["num_hidden_layers"] = config.num_hidden_layers
            config.num_hidden_layers = len(blocks)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            saved["layer_types"] = types
            config.layer_types = [types[i] for i in order]
    setattr(owner, attr, nn.ModuleList(blocks))
    return Replication([list(r) for r in ranges], inner, owner, attr, original, saved)


def undo(replication: Replication) -> None:
    """Put the original block list (and config values) back."""
    setattr(replication.owner, replication.attr, replication.original)
    config = getattr(replication.model, "config", None)
    for key, value in replication.config.items():
        setattr(config, key, value)


@contextlib.contextmanager
def replicated_for(model: nn.Module, ranges: Ranges | None, state: Any) -> Iterator[None]:
    """The replication a new adapter asks for, in force in `state.replication` while the adapter is added:
    made here where it is the first to ask, and undone again if adding it fails."""
    held = state.replication
    if ranges is None and held is None:
        yield
        return
    if ranges is not None and held is None and state.specs:
        raise ValueError("layer_replication changes the model's blocks, so it must come with the model's first "
                         f"adapter; this model already has {sorted(state.specs)} without it")
    if held is not None and [list(r) for r in ranges or []] != held.ranges:
        raise ValueError(f"every adapter on a model with replicated layers holds the same layer_replication: "
                         f"this model's is {held.ranges}, this adapter asks for {ranges}")
    made = held is None
    if made:
        state.replication = replicate(model, ranges)
    try:
        yield
    except BaseException:
        if made:
            undo(state.replication)
            state.replication = None
        raise


def release(state: Any) -> None:
    """Undo the replication once no adapter holds it (after one is removed)."""
    if state.replication is not None and not state.specs:
        undo(state.replication)
        state.replication = None


def refuse_merge(state: Any) -> None:
    if state.replication is not None:
        raise ValueError(f"adapters on replicated layers (layer_replication={state.replication.ranges}) cannot be "
                         "merged, as in PEFT: each base weight is shared by the copies of its block, which hold "
                         "different adapters. Run them unmerged")
