"""LoRA-XS: low-rank adaptation with extremely small number of parameters (Bałazy et al., arXiv 2405.17604).

B = U_r S_r and A = V_rᵀ come frozen from the base weight's truncated SVD; only an r×r
matrix R between them trains: ΔW = s · B R A. R starts at N(0, 1e-5²) as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import weight_svd
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec


@METHODS.register("lora-xs")
class LoRAXS(FactoredMethod):
    name = "lora-xs"
    summary = "Frozen SVD factors of W with one trained r×r matrix between them"
    paper = "2405.17604"
    suggested_lr = 0.005
    param_formula = "r²"
    option_defaults = {"init_std": 1e-5}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        u, s, vh = weight_svd(layer)
        w = layer.weight
        self.register_buffer("basis_B", (u[:, : spec.r] * s[: spec.r]).to(w.dtype))
        self.register_buffer("basis_A", vh[: spec.r].to(w.dtype).contiguous())
        init = torch.randn(spec.r, spec.r, dtype=w.dtype, device=w.device) * self.options["init_std"]
        self.lora_R = nn.Parameter(init)

    def expected_trainable_params(self) -> int:
        return self.r * self.r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.basis_A, self.basis_B @ self.lora_R
