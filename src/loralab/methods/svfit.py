"""SVFit: parameter-efficient fine-tuning by singular values (Sun et al., arXiv 2409.05926).

With W = U S Vᵀ, only the top-r singular values move: W' = W + U_r diag(δ) V_rᵀ, δ ∈ R^r
trained from zero; U_r and V_r stay frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import weight_svd
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec


@METHODS.register("svfit")
class SVFit(FactoredMethod):
    name = "svfit"
    summary = "Train shifts of W's top-r singular values, singular vectors frozen"
    paper = "2409.05926"
    suggested_lr = 0.01
    param_formula = "r"

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        u, _, vh = weight_svd(layer)
        w = layer.weight
        self.register_buffer("basis_U", u[:, : spec.r].to(w.dtype).contiguous())
        self.register_buffer("basis_V", vh[: spec.r].to(w.dtype).contiguous())
        self.lora_delta = nn.Parameter(torch.zeros(spec.r, dtype=w.dtype, device=w.device))

    def expected_trainable_params(self) -> int:
        return self.r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.basis_V, self.basis_U * self.lora_delta

    def factor_scale(self) -> float:
        return 1.0  # the paper's update has no alpha/r
