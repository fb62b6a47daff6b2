"""LoRA-SB (Ponkshe et al., arXiv 2411.19557, "Initialization using update approximation is a
silver bullet for extreme efficient low-rank fine-tuning"): only the r×r core R between a
frozen B and A trains, ΔW = s · B R A.

B and A start orthonormal from the top-r singular vectors of the base weight, R = 0, so the output
is unchanged at the start. The paper's own start, from the SVD of an approximation of the first full
fine-tuning update on calibration data, is `init="lora-sb"` (inits/lora_sb.py), which overwrites
B, A and R. Unlike LoRA-XS, B carries no singular values, so R's entries act directly on an
orthonormal basis.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import weight_svd
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec


@METHODS.register("lora-sb")
class LoRASB(FactoredMethod):
    name = "lora-sb"
    summary = "Train only the r×r core R between frozen orthonormal B and A"
    paper = "2411.19557"
    suggested_lr = 0.005
    param_formula = "r²"

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        u, _, vh = weight_svd(layer)
        w = layer.weight
        self.register_buffer("basis_B", u[:, : spec.r].to(w.dtype).contiguous())
        self.register_buffer("basis_A", vh[: spec.r].to(w.dtype).contiguous())
        self.lora_R = nn.Parameter(torch.zeros(spec.r, spec.r, dtype=w.dtype, device=w.device))

    def expected_trainable_params(self) -> int:
        return self.r * self.r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.basis_A, self.basis_B @ self.lora_R
