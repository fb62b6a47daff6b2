"""Helpers for methods built on frozen bases: the SVD of the base weight, and seeded random
matrices (so VeRA-, RandLoRA-style bases are reproducible; they are still saved with the
adapter so a reload never depends on the RNG)."""

from __future__ import annotations

import torch

from loralab.layer_kinds import LayerKind


@torch.no_grad()
def weight_svd(layer: LayerKind) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ of the canonical base weight, in float32."""
    return torch.linalg.svd(layer.matrix().detach().float(), full_matrices=False)


def seeded_randn(shape: tuple[int, ...], seed: int, like: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype=like.dtype, device=like.device)
