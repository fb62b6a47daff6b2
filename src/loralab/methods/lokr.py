"""LoKr: Kronecker-product adapter (KronA, Edalati et al., arXiv 2212.10650; LyCORIS's LoKr;
DiffuseKronA, arXiv 2402.17412).

With out = o₁·o₂ and in = i₁·i₂ (o₁, i₁ the factor closest to `factor`, default the largest
divisor ≤ √n), ΔW = s · C ⊗ (B A) where C ∈ R^{o₁×i₁} is trained in full and the large block
B A ∈ R^{o₂×i₂} is rank r. The unmerged path never forms ΔW: for x reshaped to [i₁, i₂],
(C ⊗ D) x = vec(C X Dᵀ). B starts at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


def split(n: int, factor: int | None) -> tuple[int, int]:
    """(a, n // a) with a the divisor of n closest to `factor` (default √n), a ≤ n // a."""
    target = factor or math.isqrt(n)
    divisors = [d for d in range(1, n + 1) if n % d == 0 and d <= n // d]
    a = min(divisors, key=lambda d: (abs(d - target), -d))
    return a, n // a


@METHODS.register("lokr")
class LoKr(AdapterMethod):
    name = "lokr"
    summary = "Kronecker product of a small full matrix and a low-rank block: ΔW = s·C ⊗ (BA)"
    paper = "2212.10650"
    param_formula = "o₁·i₁ + r·(o₂ + i₂), out = o₁·o₂, in = i₁·i₂"
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"factor": None}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.o1, self.o2 = split(layer.out_features, self.options["factor"])
        self.i1, self.i2 = split(layer.in_features, self.options["factor"])
        if spec.r > min(self.o2, self.i2):
            raise ValueError(f"lokr r={spec.r} exceeds the Kronecker block [{self.o2}, {self.i2}] of this layer")
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.lokr_C = nn.Parameter(torch.randn(self.o1, self.i1, **kw) / math.sqrt(self.i1))
        self.lokr_A = nn.Parameter(torch.randn(spec.r, self.i2, **kw) / math.sqrt(self.i2))
        self.lokr_B = nn.Parameter(torch.zeros(self.o2, spec.r, **kw))

    def expected_trainable_params(self) -> int:
        return self.o1 * self.i1 + self.r * (self.o2 + self.i2)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.kron(self.lokr_C, self.lokr_B @ self.lokr_A)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.i1, self.i2)  # row-major: x = vec(X) with X [i1, i2]
        y = self.lokr_C @ (xs @ self.lokr_A.T) @ self.lokr_B.T  # C X Dᵀ with D = B A
        return (self.scale * y).reshape(*lead, self.o1 * self.o2)
