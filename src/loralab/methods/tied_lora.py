"""Tied-LoRA (Renduchintala et al., arXiv 2311.09578): one A and one B shared by every layer of the
same shape, with per-layer trained scaling vectors (the paper's TL6 "vBuA" variant):
    ΔW_l = s · diag(v_l) B diag(u_l) A,   v_l ∈ R^{out}, u_l ∈ R^{r}.
v starts at one and u at zero, so the output is unchanged at the start; A and B are
random and train too. Layers of different shapes (q vs. gate projections) tie within their shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec


def _key(layer: LayerKind) -> str:
    return f"{layer.out_features}x{layer.in_features}"


@METHODS.register("tied-lora")
class TiedLoRA(FactoredMethod):
    name = "tied-lora"
    summary = "A and B tied across layers (per shape), per-layer scaling vectors u and v"
    paper = "2311.09578"
    suggested_lr = 0.003
    param_formula = "out + r per layer, plus r·(in + out) once per distinct layer shape"
    layer_kinds = ("linear", "hf-conv1d")

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        shared = nn.ParameterDict()
        for layer in layers:
            key = _key(layer)
            if f"A_{key}" in shared:
                continue
            kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
            a = torch.empty(spec.r, layer.in_features, **kw)
            b = torch.empty(layer.out_features, spec.r, **kw)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            shared[f"A_{key}"], shared[f"B_{key}"] = nn.Parameter(a), nn.Parameter(b)
        return shared

    @classmethod
    def expected_shared_params(cls, spec: AdapterSpec, layers: list[LayerKind]) -> int:
        shapes = {(layer.out_features, layer.in_features) for layer in layers}
        return sum(spec.r * (o + i) for o, i in shapes)

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.lora_v = nn.Parameter(torch.ones(layer.out_features, **kw))
        self.lora_u = nn.Parameter(torch.zeros(spec.r, **kw))

    def expected_trainable_params(self) -> int:
        return self.layer.out_features + self.r

    def tied(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared (A, B) of this layer's shape."""
        key = _key(self.layer)
        return self.shared[f"A_{key}"], self.shared[f"B_{key}"]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.tied()
        return a, self.lora_v[:, None] * b * self.lora_u
