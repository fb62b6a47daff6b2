"""LoLDU: low-rank adaptation via lower-diag-upper decomposition (Shi et al., arXiv 2410.13618).

W = P L D U (LU with partial pivoting, D the diagonal of the upper factor). The first r
components give frozen bases P L_r (out×r) and U_r (r×in, unit diagonal); the adapter
trains their diagonal z (r values, initialised to D_r) and one scalar σ:
    ΔW = σ · (P L_r) diag(z) U_r − (P L_r) diag(D_r) U_r,  σ = 1 at the start,
so the output is unchanged at init and only r + 1 values train.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("loldu")
class LoLDU(AdapterMethod):
    name = "loldu"
    summary = "Frozen LDU bases of W; train the r diagonal values and one scale"
    paper = "2410.13618"
    suggested_lr = 0.01
    param_formula = "r + 1"

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        w = layer.weight
        p, lower, upper = torch.linalg.lu(layer.matrix().detach().double())
        d = upper.diagonal()[: spec.r]
        unit_upper = upper[: spec.r] / d[:, None]
        kw = {"dtype": w.dtype, "device": w.device}
        self.register_buffer("basis_L", (p @ lower[:, : spec.r]).to(**kw).contiguous())
        self.register_buffer("basis_U", unit_upper.to(**kw).contiguous())
        self.register_buffer("diag_init", d.to(**kw))
        self.lora_diag = nn.Parameter(d.clone().to(**kw))
        self.lora_sigma = nn.Parameter(torch.ones((), **kw))

    def expected_trainable_params(self) -> int:
        return self.r + 1

    def delta_weight(self) -> torch.Tensor:
        return (self.basis_L * (self.lora_sigma * self.lora_diag - self.diag_init)) @ self.basis_U

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.through(x, self.basis_U, self.basis_L * (self.lora_sigma * self.lora_diag - self.diag_init))
