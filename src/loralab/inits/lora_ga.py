"""LoRA-GA: low-rank adaptation with gradient approximation (Wang et al., arXiv 2407.05000).

With G = U S Vᵀ the full-weight gradient averaged over a few calibration batches,
A = ζ·V[:, :r]ᵀ and B = ζ·U[:, r:2r], ζ = out^{1/4}/√γ (the paper's "stable" scale, γ = 16),
and the base keeps W − s·BA. LoRA's first step then moves W by −η·s²·(BBᵀG + GAᵀA), which is
proportional to G's best rank-2r approximation: the direction full fine-tuning would take.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods, start_from
from loralab.inits.calibration import weight_gradients
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers

GAMMA = 16.0


@initialiser("lora-ga", "A, B from the SVD of the full gradient on calibration data (first step ≈ full FT)",
             "2407.05000", needs_data=True)
@torch.no_grad()
def lora_ga(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for path, method in adapted:
        if 2 * method.r > min(method.layer.out_features, method.layer.in_features):
            raise ValueError(f"lora-ga needs 2r ≤ min(out, in); {path} is "
                             f"[{method.layer.out_features}, {method.layer.in_features}] with r={method.r}")
    low_rank_methods(adapted, "lora-ga")
    grads = weight_gradients(model, adapted, context, "lora-ga: gradients")
    for path, method in over_layers(adapted, "lora-ga"):
        u, _, vh = torch.linalg.svd(grads[path].double(), full_matrices=False)
        zeta = method.layer.out_features ** 0.25 / GAMMA**0.5
        r = method.r
        b, a = zeta * u[:, r:2 * r], zeta * vh[:r]
        start_from(method, b.float(), a.float())
