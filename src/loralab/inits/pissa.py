"""PiSSA: principal singular values and vectors adaptation (Meng et al., arXiv 2404.02948).

A and B start from the top-r singular triplets of W: with W = U S Vᵀ, B = U_r S_r^{1/2},
A = S_r^{1/2} V_rᵀ (divided by √scale so that s·BA is the principal part), and the base
keeps the residual W_res = W − s·BA, so the model's output is unchanged at the start. The SVD is
exact (PEFT's "pissa"; its "pissa_niter_N" is a randomised estimate of the same factors).
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods, start_from_factors
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers


def top_singular(w: torch.Tensor, r: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_rᵀ) of the r largest (or smallest) singular values, exact SVD in float32."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    if largest:
        return u[:, :r], s[:r], vh[:r]
    return u[:, -r:], s[-r:], vh[-r:]


@initialiser("pissa", "A, B from W's top-r singular triplets; the base keeps the residual", "2404.02948")
@torch.no_grad()
def pissa(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for method in over_layers(low_rank_methods(adapted, "pissa"), "pissa"):
        u, s, vh = top_singular(method.layer.matrix(), method.r)
        start_from_factors(method, u * s.sqrt(), s.sqrt()[:, None] * vh)
