"""Task arithmetic on LoRA factors, exactly: ΔW = Σ w_i s_i B_i A_i is the LoRA with
A = [A_1; …; A_n] and B = [w_1 s_1 B_1, …, w_n s_n B_n], whose rank is Σ r_i
(task arithmetic: Ilharco et al., arXiv 2212.04089). "linear" and "cat" are the same merge here.
"""

from __future__ import annotations

import torch

from loralab.compose.merges._ops import stacked
from loralab.compose.merges.base import Factors, MergeOptions, merge_method


@merge_method("cat", "exact weighted sum: factors concatenated, ranks add up", rank_bound="none")
@merge_method("linear", "task arithmetic Σ w_i ΔW_i, exact (factors concatenated)", "2212.04089",
              rank_bound="none")
def concatenate(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return stacked(factors)
