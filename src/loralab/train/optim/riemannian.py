"""Riemannian preconditioned LoRA (Zhang & Pilanci, arXiv 2402.02347): scaled gradient descent
with r×r preconditioners, g_A ← (BᵀB + δI)⁻¹ g_A and g_B ← g_B (AAᵀ + δI)⁻¹, before AdamW.

Option "damping" (δ relative to the mean diagonal, default 1e-4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.optim import OPTIMIZERS
from loralab.train.optim.lowrank import Factors, regularised_inverse, transformed_adamw


@OPTIMIZERS.register("riemannian")
def riemannian(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    damping = float(config.optimizer_options.get("damping", 1e-4))

    def precondition(f: Factors, step: int) -> None:
        a, b = f.a.detach().float(), f.b.detach().float()
        if f.a.grad is not None:
            f.a.grad.copy_(regularised_inverse(b.T @ b, damping) @ f.a.grad.float())
        if f.b.grad is not None:
            f.b.grad.copy_(f.b.grad.float() @ regularised_inverse(a @ a.T, damping))

    return transformed_adamw(model, config, precondition)
