"""Bone: block-affine adaptation (Kang, arXiv 2409.15371; PEFT's MiSS/Bone).

W is cut into r×r blocks W_ij; every block of column-block j gets the same trained affine
map, the "weight guide" that keeps the update tied to the original weights:
    W'_ij = W_ij (I + B_j) + B_j,  i.e.  ΔW_ij = W_ij B_j + B_j,   B_j ∈ R^{r×r},
with in·r parameters in all and B = 0 at the start. Needs r to divide in and out. ΔW
depends on W, so unmerging restores a copy.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("bone")
class Bone(AdapterMethod):
    name = "bone"
    summary = "Block-affine update: every r×r block W_ij becomes W_ij(I + B_j) + B_j"
    paper = "2409.15371"
    param_formula = "in·r"
    additive = False
    layer_kinds = ("linear", "hf-conv1d")

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        for size, what in ((layer.in_features, "in"), (layer.out_features, "out")):
            if size % spec.r:
                raise ValueError(f"bone needs r to divide {what}={size}, got r={spec.r}")
        self.bone_B = nn.Parameter(torch.zeros(layer.in_features // spec.r, spec.r, spec.r,
                                               dtype=layer.weight.dtype, device=layer.weight.device))

    def expected_trainable_params(self) -> int:
        return self.layer.in_features * self.r

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.matrix().detach()
        r = self.r
        blocks = w.reshape(w.shape[0] // r, r, w.shape[1] // r, r).permute(0, 2, 1, 3)  # [out/r, in/r, r, r]
        delta = blocks @ self.bone_B + self.bone_B
        return delta.permute(0, 2, 1, 3).reshape(w.shape)
