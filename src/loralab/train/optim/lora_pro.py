"""LoRA-Pro (Wang et al., arXiv 2407.18242): adjust A's and B's gradients so that the update
they make to W, s·(B·g_A + g_B·A), is the closest low-rank match to the full gradient g.

From LoRA's own gradients (g_A = s·Bᵀg, g_B = s·g·Aᵀ), the optimal choice (with the free
Sylvester term X = 0) is
    g_A' = (1/s²) (BᵀB)⁻¹ g_A,
    g_B' = (1/s²) [I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹,
whose equivalent gradient is P_B g + (I − P_B) g P_A, the projection of g onto the matrices
LoRA can reach. Inverses are damped (option "damping", default 1e-6) so B = 0 at init is safe.
Where one factor is frozen (MiCA's B, a buffer) the other alone gives the closest match it can
reach: g_A' = (1/s²) (BᵀB)⁻¹ g_A (equivalent P_B g), or g_B' = (1/s²) g_B (AAᵀ)⁻¹ (g P_A).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.optim import OPTIMIZERS
from loralab.train.optim.lowrank import Factors, regularised_inverse, transformed_adamw


def lora_pro_grads(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scale: float,
                   damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    btb_inv = regularised_inverse(b.T @ b, damping)
    projected = grad_b - b @ (btb_inv @ (b.T @ grad_b))
    return btb_inv @ grad_a / scale**2, b_alone(a, projected, scale, damping)


def a_alone(b: torch.Tensor, grad_a: torch.Tensor, scale: float, damping: float) -> torch.Tensor:
    """(1/s²) (BᵀB)⁻¹ g_A: A's gradient whose update s·B·g_A' is P_B g."""
    return regularised_inverse(b.T @ b, damping) @ grad_a / scale**2


def b_alone(a: torch.Tensor, grad_b: torch.Tensor, scale: float, damping: float) -> torch.Tensor:
    """(1/s²) g_B (AAᵀ)⁻¹: B's gradient whose update s·g_B'·A is g P_A (of g_B's part of g)."""
    return grad_b @ regularised_inverse(a @ a.T, damping) / scale**2


@OPTIMIZERS.register("lora-pro")
def lora_pro(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    damping = float(config.optimizer_options.get("damping", 1e-6))

    def adjust(f: Factors, step: int) -> None:
        a, b, s = f.a.detach().float(), f.b.detach().float(), f.scale
        if f.a.grad is not None and f.b.grad is not None:
            new_a, new_b = lora_pro_grads(a, b, f.a.grad.float(), f.b.grad.float(), s, damping)
            f.a.grad.copy_(new_a)
            f.b.grad.copy_(new_b)
        elif f.a.grad is not None and not f.b.requires_grad:
            f.a.grad.copy_(a_alone(b, f.a.grad.float(), s, damping))
        elif f.b.grad is not None and not f.a.requires_grad:
            f.b.grad.copy_(b_alone(a, f.b.grad.float(), s, damping))

    return transformed_adamw(model, config, adjust)
