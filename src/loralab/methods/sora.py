"""SoRA: sparse low-rank adaptation (Ding et al., arXiv 2311.11696): ΔW = s · B diag(g) A.

The gate g (ones at the start) is driven to exact zeros by the `sora` rank schedule's
proximal step g ← sign(g)·max(|g| − η·λ, 0) after every optimiser step, so the effective
rank (non-zero gates) shrinks during training.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS
from loralab.methods.lora import LoRA
from loralab.spec import AdapterSpec


@METHODS.register("sora")
class SoRA(LoRA):
    name = "sora"
    summary = "LoRA with a gate vector between B and A, sparsified by a proximal (L1) step"
    paper = "2311.11696"
    rank_schedule = "sora"
    param_formula = "r·(in + out) + r"
    peft_type = None

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.lora_gate = nn.Parameter(torch.ones(spec.r, dtype=layer.weight.dtype, device=layer.weight.device))

    def expected_trainable_params(self) -> int:
        return super().expected_trainable_params() + self.r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B * self.lora_gate, self.scale

    def to_saved(self) -> dict[str, torch.Tensor]:
        return {**super().to_saved(), "lora_gate": self.lora_gate.detach()}

    def active_rank(self) -> int:
        return int((self.lora_gate != 0).sum())
