"""KaSA: knowledge-aware singular-value adaptation (Wang et al., arXiv 2412.06071).

With W = U S Vᵀ, the r smallest singular components — the knowledge least relevant to the
task — are filtered out, and a trained SVD-form update takes their place:
    ΔW = −U_min S_min V_minᵀ + s · ΔU diag(Δσ) ΔV,
ΔU ∈ R^{out×r}, Δσ ∈ R^r, ΔV ∈ R^{r×in} trained (Δσ = 0 at the start, so the start is W with
its minor components removed, as in the paper). The paper's orthogonality regularisers on
ΔU and ΔV are left to the optimiser here. The filtered part is a frozen buffer of ΔW, so
the saved adapter applies to the original base.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import weight_svd
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("kasa")
class KaSA(AdapterMethod):
    name = "kasa"
    summary = "Drop W's r minor singular components; train an SVD-form update ΔU·diag(Δσ)·ΔV in their place"
    paper = "2412.06071"
    param_formula = "r·(in + out) + r"

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        u, s, vh = weight_svd(layer)
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.register_buffer("minor", ((u[:, -spec.r:] * s[-spec.r:]) @ vh[-spec.r:]).to(**kw))
        self.kasa_U = nn.Parameter(torch.linalg.qr(torch.randn(layer.out_features, spec.r))[0].to(**kw))
        self.kasa_V = nn.Parameter(torch.linalg.qr(torch.randn(layer.in_features, spec.r))[0].T.contiguous().to(**kw))
        self.kasa_sigma = nn.Parameter(torch.zeros(spec.r, **kw))

    def expected_trainable_params(self) -> int:
        return self.r * (self.layer.in_features + self.layer.out_features) + self.r

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.kasa_U * self.kasa_sigma) @ self.kasa_V - self.minor
