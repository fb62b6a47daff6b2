"""Magnitude pruning of the merged update: the weighted sum Σ w_i ΔW_i with only its `density`
fraction of largest-magnitude entries kept, re-factorised by SVD to `rank` (default Σ r_i).
"""

from __future__ import annotations

import torch

from loralab.compose.merges._ops import deltas, keep_top, refactor
from loralab.compose.merges.base import Factors, MergeOptions, merge_method


@merge_method("magnitude-prune", "weighted sum, then keep the top-density entries by magnitude", uses_density=True)
def magnitude_prune(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return refactor(keep_top(sum(deltas(factors)), opts.density), opts.rank)
