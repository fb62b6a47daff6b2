"""AltLoRA (arXiv 2505.12455, "Towards Better Gradient Approximation in Low-Rank Adaptation with
Alternating Projections"): update B and A in turn, each with the least-squares projection of
the full gradient onto that factor's reachable space, keeping momentum in the low-rank space.

Even steps move B only, with g_B' = (1/s²) g_B (AAᵀ)⁻¹; odd steps move A only, with
g_A' = (1/s²) (BᵀB)⁻¹ g_A. (B first: at init B = 0 and A is random.) Option "damping".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.optim import OPTIMIZERS
from loralab.train.optim.lowrank import Factors, regularised_inverse, transformed_adamw


@OPTIMIZERS.register("altlora")
def altlora(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    damping = float(config.optimizer_options.get("damping", 1e-6))

    def alternate(f: Factors, step: int) -> None:
        a, b = f.a.detach().float(), f.b.detach().float()
        if step % 2 == 0:
            f.a.grad = None
            if f.b.grad is not None:
                f.b.grad.copy_(f.b.grad.float() @ regularised_inverse(a @ a.T, damping) / f.scale**2)
        else:
            f.b.grad = None
            if f.a.grad is not None:
                f.a.grad.copy_(regularised_inverse(b.T @ b, damping) @ f.a.grad.float() / f.scale**2)

    return transformed_adamw(model, config, alternate)
