"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al., arXiv 2108.06098; LyCORIS's LoHa).

    ΔW = s · (B₁A₁) ⊙ (B₂A₂),
whose rank can reach r² with 2r(in + out) parameters. B₁ starts at zero, so ΔW = 0 at the start.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("loha")
class LoHa(AdapterMethod):
    name = "loha"
    summary = "Hadamard product of two low-rank products: ΔW = s(B₁A₁)⊙(B₂A₂), rank up to r²"
    paper = "2108.06098"
    param_formula = "2·r·(in + out)"

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        i, o, r = layer.in_features, layer.out_features, spec.r
        self.hada_A1 = nn.Parameter(torch.randn(r, i, **kw) / i**0.5)
        self.hada_B1 = nn.Parameter(torch.zeros(o, r, **kw))
        self.hada_A2 = nn.Parameter(torch.randn(r, i, **kw) / i**0.5)
        self.hada_B2 = nn.Parameter(torch.randn(o, r, **kw) / r**0.5)

    def expected_trainable_params(self) -> int:
        return 2 * self.r * (self.layer.in_features + self.layer.out_features)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.hada_B1 @ self.hada_A1) * (self.hada_B2 @ self.hada_A2)
