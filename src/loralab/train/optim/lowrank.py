"""What the LoRA-aware optimisers share: finding each adapter's (A, B, scale) and AdamW with
a gradient transform applied just before each step (LoRA-Pro, AltLoRA, Riemannian)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loralab.methods.base import AdapterMethod
from loralab.train.optim import decay_groups


@dataclass
class Factors:
    a: nn.Parameter  # [r, in]
    b: nn.Parameter  # [out, r]
    scale: float


def lora_factors(model: nn.Module) -> list[Factors]:
    """(A, B, scale) of every adapter method with LoRA factors that trains."""
    found = [Factors(m.lora_A, m.lora_B, m.scale) for m in model.modules()
             if isinstance(m, AdapterMethod) and hasattr(m, "lora_A") and hasattr(m, "lora_B")
             and (m.lora_A.requires_grad or m.lora_B.requires_grad)]
    if not found:
        raise ValueError("this optimiser needs LoRA-style adapters (with A and B factors) that train")
    return found


def regularised_inverse(m: torch.Tensor, damping: float) -> torch.Tensor:
    """(M + δ·mean(diag M)·I)⁻¹ for a small symmetric r×r matrix; δ keeps B = 0 at init finite."""
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return torch.linalg.inv(m + (damping * m.diagonal().mean().clamp_min(1e-12) + 1e-12) * eye)


class TransformedAdamW(torch.optim.AdamW):
    """AdamW whose step first rewrites the LoRA gradients with `transform(factors, step)`."""

    def __init__(self, params: Any, factors: list[Factors], transform: Callable[[Factors, int], None],
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.factors = factors
        self.transform = transform
        self.steps_taken = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        for f in self.factors:
            if f.a.grad is not None or f.b.grad is not None:
                self.transform(f, self.steps_taken)
        self.steps_taken += 1
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["steps_taken"] = self.steps_taken
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps_taken = state_dict.pop("steps_taken", 0)
        super().load_state_dict(state_dict)


def transformed_adamw(model: nn.Module, config: Any, transform: Callable[[Factors, int], None]) -> TransformedAdamW:
    return TransformedAdamW(decay_groups(model, config.weight_decay), lora_factors(model), transform,
                            lr=config.lr, betas=tuple(config.betas))
