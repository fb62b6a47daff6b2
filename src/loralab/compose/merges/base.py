"""The protocol of a merge method, and the registry `combine` looks methods up in.

A merge method is a function of one layer: it takes every adapter's factors for that layer,
(A_i [r_i, in], B_i [out, r_i]) with the adapter's scale s_i and the caller's weight w_i
already folded into B_i (so ΔW_i = B_i A_i), and returns new factors (A [k, in], B [out, k]).
Adding a method is one new file in this package that decorates such a function:

    @merge_method("my-merge", summary="…", paper="arXiv id", rank_bound="layer", default_rank="sum")
    def my_merge(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from loralab.registry import Registry

Factors = list[tuple[torch.Tensor, torch.Tensor]]
LayerMerge = Callable[["Factors", "MergeOptions"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MergeOptions:
    """What one layer's merge may use: the target rank, the kept fraction, a seeded generator."""

    rank: int
    density: float
    generator: torch.Generator


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    rank_bound:   "none" — exact, keeps every component (rank Σ r_i), takes no `rank`;
                  "sum" — the rank may be at most Σ r_i (the merge cannot carry more);
                  "layer" — the rank may be anything a layer allows (dense results are full rank).
    default_rank: "sum" (Σ r_i: exact where the result's rank fits) or "max" (the largest r_i).
    """

    name: str
    fn: LayerMerge
    summary: str
    paper: str
    rank_bound: Literal["none", "sum", "layer"]
    default_rank: Literal["sum", "max"]
    uses_density: bool = False


MERGES: Registry[MergeMethod] = Registry("merge method", "loralab.compose.merges")


def merge_method(name: str, summary: str, paper: str = "", rank_bound: str = "layer", default_rank: str = "sum",
                 uses_density: bool = False) -> Callable[[LayerMerge], LayerMerge]:
    """Register the decorated per-layer function as merge method `name`."""

    def add(fn: LayerMerge) -> LayerMerge:
        MERGES.register(name)(MergeMethod(name, fn, summary, paper, rank_bound, default_rank, uses_density))
        return fn

    return add
