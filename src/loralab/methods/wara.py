"""WaRA: wavelet low-rank adaptation (arXiv 2506.24092).

The low-rank update lives in the wavelet domain of W: with H_out, H_in the orthonormal
one-level Haar transforms, ΔW = H_outᵀ (s · B A) H_in, i.e. the inverse 2-D wavelet transform
of a rank-r coefficient matrix. The Haar basis concentrates smooth structure in few
coefficients, so the same rank reaches updates LoRA's pixel-domain B A cannot. Needs even
in/out sizes (one Haar level); B starts at zero. (The paper factorises within the wavelet
subbands, A ∈ R^{r×in/2}; here one rank-r factorisation spans all four subbands.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


def haar_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal one-level Haar analysis matrix H (n even): rows 0..n/2−1 averages, then details."""
    if n % 2:
        raise ValueError(f"a one-level Haar transform needs an even size, got {n}")
    h = torch.zeros(n, n, dtype=dtype)
    k = torch.arange(n // 2)
    h[k, 2 * k] = h[k, 2 * k + 1] = 1 / math.sqrt(2)
    h[n // 2 + k, 2 * k] = 1 / math.sqrt(2)
    h[n // 2 + k, 2 * k + 1] = -1 / math.sqrt(2)
    return h


@METHODS.register("wara")
class WaRA(AdapterMethod):
    name = "wara"
    summary = "Rank-r update of W's Haar wavelet coefficients: ΔW = H_outᵀ (s·BA) H_in"
    paper = "2506.24092"
    param_formula = "r·(in + out)"
    layer_kinds = ("linear", "hf-conv1d", "conv")

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        w = layer.weight
        self.register_buffer("haar_out", haar_matrix(layer.out_features).to(w.dtype).to(w.device), persistent=False)
        self.register_buffer("haar_in", haar_matrix(layer.in_features).to(w.dtype).to(w.device), persistent=False)
        self.lora_A = nn.Parameter(torch.empty(spec.r, layer.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, spec.r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def expected_trainable_params(self) -> int:
        return self.r * (self.layer.in_features + self.layer.out_features)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.haar_out.T @ self.lora_B) @ (self.lora_A @ self.haar_in)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.through(x, self.lora_A @ self.haar_in, self.scale * self.haar_out.T @ self.lora_B)

