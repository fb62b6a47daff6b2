"""Measuring what training keeps in memory, on any device (the CPU has no peak-memory counter)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_tensor_megabytes(fn: Callable[[], object]) -> float:
    """MB of distinct storages autograd keeps for backward while `fn()` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2**20
