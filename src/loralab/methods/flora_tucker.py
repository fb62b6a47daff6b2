"""FLoRA: low-rank core space for N-dimensional parameters (Si et al., arXiv 2405.14739).

The update is a Tucker decomposition with a trained core: for a linear layer
ΔW = s · B G A (G ∈ R^{r×r}, a 2-mode Tucker), and for a convolution kernel
[out, in, k₁, k₂] the core keeps the spatial modes, ΔW = s · G ×₁ B ×₂ Aᵀ with
G ∈ R^{r×r×k₁×k₂}, so the kernel's structure is kept rather than flattened away.
B starts at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("flora-tucker")
class FLoRATucker(AdapterMethod):
    name = "flora-tucker"
    summary = "Tucker update with a trained core: B·G·A (linear), G ×₁ B ×₂ Aᵀ over kernel modes (conv)"
    paper = "2405.14739"
    param_formula = "r·(out + in_channels) + r²·∏kernel"
    layer_kinds = ("linear", "hf-conv1d", "conv")

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        w = layer.weight
        kw = {"dtype": w.dtype, "device": w.device}
        self.kernel = tuple(w.shape[2:]) if layer.name == "conv" else ()
        channels = w.shape[1] if layer.name == "conv" else layer.in_features
        self.lora_A = nn.Parameter(torch.empty(spec.r, channels, **kw))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, spec.r, **kw))
        self.lora_core = nn.Parameter(torch.empty(spec.r, spec.r, *self.kernel, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.normal_(self.lora_core, std=1 / spec.r)

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        channels = layer.weight.shape[1] if layer.name == "conv" else layer.in_features
        return min(layer.out_features, channels)

    def expected_trainable_params(self) -> int:
        return self.r * (self.layer.out_features + self.lora_A.shape[1]) + self.r * self.r * math.prod(self.kernel)

    def delta_weight(self) -> torch.Tensor:
        if self.layer.name == "conv":  # core [r, r, k...] → kernel [out, in, k...]
            kernel = torch.einsum("or,rs...,si->oi...", self.lora_B, self.lora_core, self.lora_A)
            return self.scale * kernel.reshape(self.layer.out_features, -1)
        return self.scale * self.lora_B @ self.lora_core @ self.lora_A

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.name == "conv":
            return super().delta(x)
        return self.through(x, self.lora_A, self.scale * self.lora_B @ self.lora_core)
