"""NLoRA: Nyström-initiated low-rank adaptation (Guo et al., "NLoRA: Nyström-Initiated Low-Rank
Adaptation for Large Language Models", arXiv 2502.14482).

PiSSA's idea without an SVD: the Nyström approximation of W from two random sketches
Ω ∈ R^{in×r}, Ψ ∈ R^{out×r} (seeded per layer),
    W ≈ (W Ω) (Ψᵀ W Ω)⁺ (Ψᵀ W),
gives B = W Ω and A = (Ψᵀ W Ω)⁺ Ψᵀ W (the paper's intermediate matrix folded into A). The
base keeps W − BA, so the output is unchanged; a W of rank ≤ r is captured exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods, start_from_factors
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers


def nystrom_factors(w: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(w.shape[1], r, generator=g, dtype=torch.float64)
    psi = torch.randn(w.shape[0], r, generator=g, dtype=torch.float64)
    w = w.double()
    b = w @ omega
    a = torch.linalg.pinv(psi.T @ b) @ (psi.T @ w)
    return b, a


@initialiser("nlora", "A, B from a Nyström sketch of W (no SVD); the base keeps the residual",
             paper="2502.14482")
@torch.no_grad()
def nlora(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for index, method in enumerate(over_layers(low_rank_methods(adapted, "nlora"), "nlora")):
        b, a = nystrom_factors(method.layer.matrix().detach(), method.r, seed=index)
        start_from_factors(method, b.float(), a.float())
