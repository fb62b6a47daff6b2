"""Uni-LoRA: one vector is all you need (Li et al., arXiv 2506.00799).

Every LoRA parameter of every layer of the adapter, flattened into one long vector of size
D, is reconstructed from ONE trained vector θ ∈ R^d through a fixed isometric projection P:
each of the D entries reads one randomly assigned entry of θ, scaled by 1/√(count of entries
reading it), so the columns of P are orthonormal (PᵀP = I). Here P projects the change of
the LoRA parameters from their initial point (A₀ Kaiming, B₀ = 0), the "intrinsic subspace"
reading: A = A₀ + (Pθ)_A, B = (Pθ)_B, θ = 0 at the start, so ΔW = 0 then.
P and A₀ are regenerated from the seed (option `seed`), θ (size option `dim`) is saved.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec


class Projection(nn.Module):
    """θ and the random assignment of the D LoRA entries to θ's entries, handed out layer by layer."""

    def __init__(self, sizes: list[int], dim: int, seed: int, like: torch.Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        index = torch.randint(0, dim, (sum(sizes),), generator=g)
        counts = torch.bincount(index, minlength=dim).clamp_min(1)
        self.theta = nn.Parameter(torch.zeros(dim, dtype=like.dtype, device=like.device))
        self.register_buffer("index", index.to(like.device), persistent=False)
        self.register_buffer("weight", counts[index].to(like.dtype).rsqrt().to(like.device), persistent=False)
        self.cursor = 0
        self.generator = g

    def claim(self, size: int) -> slice:
        part = slice(self.cursor, self.cursor + size)
        self.cursor += size
        return part

    def values(self, part: slice) -> torch.Tensor:
        return self.theta[self.index[part]] * self.weight[part]


@METHODS.register("uni-lora")
class UniLoRA(FactoredMethod):
    name = "uni-lora"
    summary = "All layers' LoRA parameters projected from one trained vector θ (isometric random P)"
    paper = "2506.00799"
    param_formula = "d for the whole adapter (option dim)"
    suggested_lr = 5e-3
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"dim": 4096, "seed": 0}

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        sizes = [spec.r * (layer.in_features + layer.out_features) for layer in layers]
        return Projection(sizes, spec.options.get("dim", 4096), spec.options.get("seed", 0), layers[0].weight)

    @classmethod
    def expected_shared_params(cls, spec: AdapterSpec, layers: list[LayerKind]) -> int:
        return spec.options.get("dim", 4096)

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.part_a = shared.claim(spec.r * layer.in_features)
        self.part_b = shared.claim(spec.r * layer.out_features)
        a0 = torch.empty(spec.r, layer.in_features)
        bound = 1 / math.sqrt(layer.in_features)  # Kaiming-uniform with a = √5, as nn.Linear
        a0.uniform_(-bound, bound, generator=shared.generator)
        self.register_buffer("init_A", a0.to(layer.weight), persistent=False)

    def expected_trainable_params(self) -> int:
        return 0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.init_A + self.shared.values(self.part_a).view_as(self.init_A)
        b = self.shared.values(self.part_b).view(self.layer.out_features, self.r)
        return a, b
