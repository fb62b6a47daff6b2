"""TIES-Merging (Yadav et al., arXiv 2306.01708) on each layer's dense updates: trim every
w_i ΔW_i to its `density` fraction of largest-magnitude entries, elect each entry's sign as
the sign of the trimmed sum, average the entries that agree with it (disjoint mean), then
re-factorise by SVD to `rank` (default Σ r_i; exact when the result's rank fits).
"""

from __future__ import annotations

import torch

from loralab.compose.merges._ops import deltas, elect_and_average, keep_top, refactor
from loralab.compose.merges.base import Factors, MergeOptions, merge_method


@merge_method("ties", "trim to top-density magnitudes, elect signs, disjoint mean", "2306.01708",
              uses_density=True)
def ties(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return refactor(elect_and_average([keep_top(d, opts.density) for d in deltas(factors)]), opts.rank)
