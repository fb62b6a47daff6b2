"""NOLA: compressing LoRA using linear combination of random basis (Koohpayegani et al., arXiv 2310.02556).

A and B are mixtures of k frozen random matrices (drawn from a seed):
    A = Σ_i α_i A_i,  B = Σ_j β_j B_j,  ΔW = s · B A,
so only the k_a + k_b coefficients train, independently of the layer's size and of r.
β starts at zero (ΔW = 0), α at N(0, 1/k).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import seeded_randn
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec


@METHODS.register("nola")
class NOLA(FactoredMethod):
    name = "nola"
    summary = "A and B as trained mixtures of k frozen random bases each"
    paper = "2310.02556"
    param_formula = "k_a + k_b (options num_basis_a, num_basis_b)"
    suggested_lr = 1e-2
    option_defaults = {"num_basis_a": 64, "num_basis_b": 64, "seed": 0}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        ka, kb, seed = self.options["num_basis_a"], self.options["num_basis_b"], self.options["seed"]
        w = layer.weight
        self.register_buffer("basis_A", seeded_randn((ka, spec.r, layer.in_features), seed, w,
                                                     1 / math.sqrt(layer.in_features)))
        self.register_buffer("basis_B", seeded_randn((kb, layer.out_features, spec.r), seed + 1, w,
                                                     1 / math.sqrt(spec.r)))
        self.nola_alpha = nn.Parameter(seeded_randn((ka,), seed + 2, w, 1 / math.sqrt(ka)))
        self.nola_beta = nn.Parameter(torch.zeros(kb, dtype=w.dtype, device=w.device))

    def expected_trainable_params(self) -> int:
        return self.nola_alpha.numel() + self.nola_beta.numel()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.einsum("k,kri->ri", self.nola_alpha, self.basis_A)
        b = torch.einsum("k,kor->or", self.nola_beta, self.basis_B)
        return a, b
