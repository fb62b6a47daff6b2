"""TeRA: vector-based random tensor network for high-rank adaptation of large language models
(Gu et al., arXiv 2509.03234).

W's update is tensorised: out = o₁·o₂ and in = i₁·i₂ give a 4-way tensor, written as a
Tucker network whose core G and factor matrices U_k (n_k × n_k) are frozen, random and shared
by every layer of the same shape; each layer trains only diagonal scalings λ_k of the factors:
    ΔW = unfold( G ×₁ U₁Λ₁ ×₂ U₂Λ₂ ×₃ U₃Λ₃ ×₄ U₄Λ₄ ),   Λ_k = diag(λ_k),
so the update can be full rank while only o₁ + o₂ + i₁ + i₂ values train. λ₁ starts at zero
(ΔW = 0), the others at one. r is not used (the factors are square, for full rank).
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.methods.lokr import split
from loralab.spec import AdapterSpec


def _modes(layer: LayerKind) -> tuple[int, int, int, int]:
    o1, o2 = split(layer.out_features, None)
    i1, i2 = split(layer.in_features, None)
    return o1, o2, i1, i2


@METHODS.register("tera")
class TeRA(AdapterMethod):
    name = "tera"
    summary = "Frozen random Tucker network over the tensorised ΔW; per-layer trained diagonal scalings"
    paper = "2509.03234"
    param_formula = "o₁ + o₂ + i₁ + i₂ (out = o₁o₂, in = i₁i₂)"
    suggested_lr = 1e-2
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"seed": 0}

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        g = torch.Generator().manual_seed(spec.options.get("seed", 0))
        shared = nn.Module()
        for layer in layers:
            modes = _modes(layer)
            key = "x".join(map(str, modes))
            if hasattr(shared, f"core_{key}"):
                continue
            shared.register_buffer(f"core_{key}", (torch.randn(*modes, generator=g)
                                                   / (layer.out_features * layer.in_features) ** 0.25).to(layer.weight))
            for k, n in enumerate(modes):
                shared.register_buffer(f"factor{k}_{key}", (torch.randn(n, n, generator=g) / n**0.5).to(layer.weight))
        return shared

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.modes = _modes(layer)
        self.key = "x".join(map(str, self.modes))
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.tera_scales = nn.ParameterList([nn.Parameter(torch.zeros(self.modes[0], **kw))]
                                            + [nn.Parameter(torch.ones(n, **kw)) for n in self.modes[1:]])

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r is unused

    def expected_trainable_params(self) -> int:
        return sum(self.modes)

    def delta_weight(self) -> torch.Tensor:
        core = getattr(self.shared, f"core_{self.key}")
        f = [getattr(self.shared, f"factor{k}_{self.key}") * self.tera_scales[k] for k in range(4)]
        tensor = torch.einsum("abcd,pa,qb,rc,sd->pqrs", core, *f)
        return self.scale * tensor.reshape(self.layer.out_features, self.layer.in_features)

    def to_saved(self) -> dict[str, torch.Tensor]:
        return {f"tera_scales.{k}": p.detach() for k, p in enumerate(self.tera_scales)}
