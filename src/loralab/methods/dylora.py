"""DyLoRA: dynamic, search-free low-rank adaptation (Valipour et al., arXiv 2210.07558).

LoRA whose rank-one components are ordered: with active rank b ≤ r the update is
ΔW_b = (alpha / b) · B[:, :b] A[:b]. The `dylora` rank schedule samples b each training step
(nested-dropout style: every component up to b trains), so after training any truncation
b works; pick one for inference with `loralab.train.rank.dylora.set_rank(model, b)`.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS
from loralab.methods.lora import LoRA
from loralab.spec import AdapterSpec


@METHODS.register("dylora")
class DyLoRA(LoRA):
    name = "dylora"
    summary = "LoRA with ordered components: trained on random truncations, any rank b ≤ r usable"
    paper = "2210.07558"
    rank_schedule = "dylora"
    param_formula = "r·(in + out)"
    peft_type = None

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.alpha = spec.alpha
        self.active_rank = spec.r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        b = self.active_rank
        return self.lora_A[:b], self.lora_B[:, :b], self.alpha / b
