"""RandLoRA: full-rank parameter-efficient fine-tuning (Albert et al., arXiv 2502.00987).

A sum of n frozen random rank-r bases, each with two trained diagonal scalings:
    ΔW = s · Σ_{i<n} B_i diag(λ_i) A_i diag(γ_i),   B_i ∈ R^{out×r}, A_i ∈ R^{r×in} frozen,
so n·r can reach full rank while only n·(r + in) values train. n defaults to
⌈min(in, out)/r⌉ (full rank); λ starts at zero (the output is unchanged), γ at one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import seeded_randn
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("randlora")
class RandLoRA(AdapterMethod):
    name = "randlora"
    summary = "Full-rank update from n frozen random rank-r bases with trained diagonal scalings"
    paper = "2502.00987"
    suggested_lr = 0.003
    param_formula = "n·(r + in), n = ⌈min(in, out)/r⌉"
    option_defaults = {"num_bases": None, "seed": 0}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        n = self.options["num_bases"] or math.ceil(min(layer.in_features, layer.out_features) / spec.r)
        self.n = n
        w = layer.weight
        seed = self.options["seed"]
        self.register_buffer("bases_B", seeded_randn((n, layer.out_features, spec.r), seed, w,
                                                     1 / math.sqrt(layer.out_features)))
        self.register_buffer("bases_A", seeded_randn((n, spec.r, layer.in_features), seed + 1, w,
                                                     1 / math.sqrt(layer.in_features)))
        self.lora_lambda = nn.Parameter(torch.zeros(n, spec.r, dtype=w.dtype, device=w.device))
        self.lora_gamma = nn.Parameter(torch.ones(n, layer.in_features, dtype=w.dtype, device=w.device))

    def expected_trainable_params(self) -> int:
        return self.n * (self.r + self.layer.in_features)

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)

    def delta_weight(self) -> torch.Tensor:
        scaled_b = self.bases_B * self.lora_lambda[:, None, :]  # B_i diag(λ_i)
        scaled_a = self.bases_A * self.lora_gamma[:, None, :]  # A_i diag(γ_i)
        return self.scale * torch.einsum("nor,nri->oi", scaled_b, scaled_a)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.name not in ("linear", "hf-conv1d"):
            return super().delta(x)
        a = (self.bases_A * self.lora_gamma[:, None, :]).reshape(self.n * self.r, -1)
        b = (self.bases_B * self.lora_lambda[:, None, :]).permute(1, 0, 2).reshape(self.layer.out_features, -1)
        return self.scale * self.through(x, a, b)
