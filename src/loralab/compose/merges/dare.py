"""DARE, "Language Models are Super Mario" (Yu et al., arXiv 2311.03099): drop each entry of
every w_i ΔW_i with probability 1 − density and rescale the survivors by 1/density, then sum
("dare") or apply TIES's sign election and disjoint mean ("dare-ties"); re-factorised by SVD to
`rank` (default Σ r_i). The drops are seeded per layer from `seed` and the layer's path.
"""

from __future__ import annotations

import torch

from loralab.compose.merges._ops import deltas, drop, elect_and_average, refactor
from loralab.compose.merges.base import Factors, MergeOptions, merge_method


def _dropped(factors: Factors, opts: MergeOptions) -> list[torch.Tensor]:
    return [drop(d, opts.density, opts.generator) for d in deltas(factors)]


@merge_method("dare", "random drop (keep density), rescale by 1/density, sum", "2311.03099", uses_density=True)
def dare(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return refactor(sum(_dropped(factors, opts)), opts.rank)


@merge_method("dare-ties", "DARE's drop and rescale, then TIES's sign election and disjoint mean", "2311.03099",
              uses_density=True)
def dare_ties(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return refactor(elect_and_average(_dropped(factors, opts)), opts.rank)
