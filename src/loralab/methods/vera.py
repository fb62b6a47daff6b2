"""VeRA: vector-based random matrix adaptation (Kopiczko et al., arXiv 2310.11454).

One pair of frozen random matrices A (r×in) and B (out×r), drawn from one seed and shared by
every layer (a layer takes the top-left block of the pair drawn at the adapter's largest
shape), and two trained vectors per layer:
    ΔW = Λ_b B Λ_d A,   b ∈ R^{out} (zero at the start), d ∈ R^{r} (d_init, 0.1 in the paper).
PEFT calls it VeRA; it is saved here with loralab's keys. Scale s is not used (as in the paper).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec


@METHODS.register("vera")
class VeRA(FactoredMethod):
    name = "vera"
    summary = "Frozen random A, B shared by all layers; trained scaling vectors b and d"
    paper = "2310.11454"
    param_formula = "out + r"
    suggested_lr = 1e-2
    option_defaults = {"seed": 0, "d_init": 0.1}

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        out = max(layer.out_features for layer in layers)
        inp = max(layer.in_features for layer in layers)
        g = torch.Generator().manual_seed(spec.options.get("seed", 0))
        shared = nn.Module()
        bound_a, bound_b = 1 / math.sqrt(inp), 1 / math.sqrt(spec.r)  # Kaiming-uniform scale, as the paper
        like = layers[0].weight
        shared.register_buffer("vera_A", ((torch.rand(spec.r, inp, generator=g) * 2 - 1) * bound_a).to(like))
        shared.register_buffer("vera_B", ((torch.rand(out, spec.r, generator=g) * 2 - 1) * bound_b).to(like))
        return shared

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.lora_b = nn.Parameter(torch.zeros(layer.out_features, **kw))
        self.lora_d = nn.Parameter(torch.full((spec.r,), float(self.options["d_init"]), **kw))

    def expected_trainable_params(self) -> int:
        return self.layer.out_features + self.r

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.shared.vera_A[:, : self.layer.in_features],
                self.shared.vera_B[: self.layer.out_features])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.bases()
        return a, self.lora_b[:, None] * b * self.lora_d

    def factor_scale(self) -> float:
        return 1.0  # VeRA's b and d carry the scale
