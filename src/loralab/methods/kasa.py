"""KaSA: knowledge-aware singular-value adaptation (Wang et al., arXiv 2412.06071).

With W = U S Vᵀ, the r smallest singular components — the knowledge least relevant to the
task — are filtered out, and a trained SVD-form update takes their place:
    ΔW = −U_min S_min V_minᵀ + s · ΔU diag(Δσ) ΔV,
ΔU ∈ R^{out×r}, Δσ ∈ R^r, ΔV ∈ R^{r×in} trained (Δσ = 0 at the start, so the start is W with
its minor components removed, as in the paper). The paper's orthogonality regularisers on
ΔU and ΔV are left to the optimiser here. The filtered part is a frozen buffer of ΔW, so
the base weights stay as they are.

Saved as PEFT's KaSA LoRA variant (`kasa_config`, PEFT ≥ 0.21) on linear layers: ΔV, ΔU and Δσ
as `lora_A.weight`, `lora_B.weight` and `lora_diag`. PEFT truncates the base weight by the same
SVD when it loads the file, and loralab recomputes the filtered part, so neither file holds it;
loralab's older files kept it (`minor`, with the factors under their own names) and still load
with it. On other layer types (which PEFT's KaSA does not take) the file is in loralab's layout.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._frozen import weight_svd
from loralab.methods.base import METHODS, AdapterMethod, SavedTensors, check_shape
from loralab.spec import AdapterSpec


@METHODS.register("kasa")
class KaSA(AdapterMethod):
    name = "kasa"
    summary = "Drop W's r minor singular components; train an SVD-form update ΔU·diag(Δσ)·ΔV in their place"
    paper = "2412.06071"
    param_formula = "r·(in + out) + r"
    peft_type = "LORA"
    peft_lora_field = "kasa_config"
    peft_when = "linear layers only"
    KASA_CONFIG: ClassVar[dict[str, float]] = {"beta": 1e-4, "gamma": 1e-3}  # PEFT's regulariser weights
    OLD_NAMES: ClassVar[dict[str, str]] = {"kasa_V": "lora_A.weight", "kasa_U": "lora_B.weight",
                                           "kasa_sigma": "lora_diag"}

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

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any] | None:
        linear = all(m.layer.name == "linear" for m in adapted.values())
        return {"kasa_config": dict(cls.KASA_CONFIG)} if linear else None

    def to_saved(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.kasa_V.detach(), "lora_B.weight": self.kasa_U.detach(),
                "lora_diag": self.kasa_sigma.detach()}

    @classmethod
    def remap_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, t in tensors.items():
            path, _, leaf = key.rpartition(".")
            out[f"{path}.{cls.OLD_NAMES[leaf]}" if leaf in cls.OLD_NAMES else key] = t
        return out

    def from_saved(self, tensors: SavedTensors, where: str) -> None:
        super().from_saved(tensors, where)
        minor = tensors.get("minor")  # files of loralab's older layout kept the filtered part
        if minor is not None:
            check_shape(f"{where}.minor", minor.shape, self.minor.shape)
            with torch.no_grad():
                self.minor.copy_(minor)
