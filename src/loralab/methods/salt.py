"""SALT: singular value adaptation with low-rank transformation (Elsayed et al., arXiv 2503.16055).

With W = U S Vᵀ, the top-r singular values get a trained scale α and shift β, and the
remaining subspace gets a LoRA of rank `lora_rank` restricted to it:
    W' = U_r diag(α ⊙ S_r + β) V_rᵀ + U_rest (S_rest + s·B A) V_restᵀ
so ΔW = U_r diag((α − 1) ⊙ S_r + β) V_rᵀ + s · (U_rest B)(A V_restᵀ), with α = 1, β = 0, B = 0 at start.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import weight_svd
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("salt")
class SALT(AdapterMethod):
    name = "salt"
    summary = "Scale and shift W's top-r singular values, plus a LoRA inside the remaining subspace"
    paper = "2503.16055"
    param_formula = "2r + lora_rank·2·(min(in, out) − r)"
    option_defaults = {"lora_rank": 4}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        u, s, vh = weight_svd(layer)
        rest = len(s) - spec.r
        k = self.options["lora_rank"]
        if not 1 <= k <= rest:
            raise ValueError(f"salt lora_rank must be in [1, {rest}] (the rank left after r={spec.r}), got {k}")
        w = layer.weight
        kw = {"dtype": w.dtype, "device": w.device}
        self.register_buffer("basis_U", u.to(**kw).contiguous())
        self.register_buffer("basis_V", vh.to(**kw).contiguous())
        self.register_buffer("values", s.to(**kw))
        self.lora_scale = nn.Parameter(torch.ones(spec.r, **kw))
        self.lora_shift = nn.Parameter(torch.zeros(spec.r, **kw))
        self.lora_A = nn.Parameter(torch.empty(k, rest, **kw))
        self.lora_B = nn.Parameter(torch.zeros(rest, k, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return min(layer.out_features, layer.in_features) - 1

    def expected_trainable_params(self) -> int:
        rest = min(self.layer.out_features, self.layer.in_features) - self.r
        return 2 * self.r + 2 * self.options["lora_rank"] * rest

    def delta_weight(self) -> torch.Tensor:
        r = self.r
        top = (self.basis_U[:, :r] * ((self.lora_scale - 1) * self.values[:r] + self.lora_shift)) @ self.basis_V[:r]
        low = self.scale * (self.basis_U[:, r:] @ self.lora_B) @ (self.lora_A @ self.basis_V[r:])
        return top + low
