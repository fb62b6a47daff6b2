"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al., arXiv 2205.05638).

A trained vector rescales the layer: its output, y = l ⊙ (W x) + b, or — for feed-forward
down-projections (option `feedforward=True`) — its input, y = W (l ⊙ x) + b. l starts at one.
Non-additive: merging scales W's rows (or columns); the bias is not scaled. PEFT calls it IA3.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("ia3")
class IA3(AdapterMethod):
    name = "ia3"
    summary = "A trained vector rescales the layer's output (or its input, for feed-forward layers)"
    paper = "2205.05638"
    param_formula = "out (or in, with feedforward=True)"
    suggested_lr = 1e-2
    additive = False
    needs_base = True
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"feedforward": False}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        size = layer.in_features if self.options["feedforward"] else layer.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=layer.weight.dtype, device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r is unused

    def expected_trainable_params(self) -> int:
        return self.ia3_l.numel()

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if self.options["feedforward"]:
            return self.layer.apply(x * (self.ia3_l - 1), self.layer.matrix())
        return base * (self.ia3_l - 1)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.ia3_l if self.options["feedforward"] else weight * self.ia3_l[:, None]

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.matrix().detach()
        return self.merged_weight(w) - w
