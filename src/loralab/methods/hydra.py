"""Hydra: multi-head low-rank adaptation (Kim et al., arXiv 2309.06922).

A parallel branch (LoRA) and a sequential branch (a LoRA on the input, before W):
    y = W x + s·B_p A_p x + W (s·B_s A_s x),   so  ΔW = s · (B_p A_p + W B_s A_s),
with B_p ∈ R^{out×r}, A_p ∈ R^{r×in}, B_s ∈ R^{in×r}, A_s ∈ R^{r×in}; both B start at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("hydra")
class Hydra(AdapterMethod):
    name = "hydra"
    summary = "Parallel LoRA plus a sequential LoRA applied before W: ΔW = s(B_p A_p + W B_s A_s)"
    paper = "2309.06922"
    param_formula = "r·(in + out) + 2·r·in"
    layer_kinds = ("linear", "hf-conv1d")
    additive = False  # ΔW depends on W, so unmerging restores a copy rather than subtracting

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        i, o, r = layer.in_features, layer.out_features, spec.r
        self.lora_A = nn.Parameter(torch.empty(r, i, **kw))
        self.lora_B = nn.Parameter(torch.zeros(o, r, **kw))
        self.seq_A = nn.Parameter(torch.empty(r, i, **kw))
        self.seq_B = nn.Parameter(torch.zeros(i, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.seq_A, a=math.sqrt(5))

    def expected_trainable_params(self) -> int:
        return self.r * (self.layer.in_features + self.layer.out_features) + 2 * self.r * self.layer.in_features

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.matrix().detach()
        return self.scale * (self.lora_B @ self.lora_A + w @ self.seq_B @ self.seq_A)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        parallel = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        sequential = self.layer.apply(nn.functional.linear(nn.functional.linear(x, self.seq_A), self.seq_B),
                                      self.layer.matrix())
        return self.scale * (parallel + sequential)
