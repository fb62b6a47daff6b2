"""The weighted sum Σ w_i ΔW_i re-factorised to a chosen rank k by truncated SVD: the best
rank-k approximation in Frobenius and spectral norm (Eckart–Young). Computed from the factors
(QR of the stacked A and B, SVD of the small core), never forming the dense ΔW.
"""

from __future__ import annotations

import torch

from loralab.compose.merges._ops import refactor_product, stacked
from loralab.compose.merges.base import Factors, MergeOptions, merge_method


@merge_method("svd", "weighted sum, truncated to `rank` by SVD (best rank-k approximation)",
              rank_bound="sum", default_rank="max")
def svd(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = stacked(factors)
    return refactor_product(a, b, opts.rank)
