"""FourierFT: parameter-efficient fine-tuning with the discrete Fourier transform (Gao et al., arXiv 2405.03003).

n spectral coefficients c at fixed random frequencies (seeded) are trained; the update is
the real part of the inverse 2-D DFT of the otherwise-zero spectrum F:
    ΔW = α · Re(IDFT2(F)),  F[u_k, v_k] = c_k,
with α the option `scaling` (the paper's default 150 for roughly unit-variance weights).
c starts at zero.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("fourierft")
class FourierFT(AdapterMethod):
    name = "fourierft"
    summary = "n trained spectral coefficients; ΔW = α·Re(IDFT2) of the sparse spectrum"
    paper = "2405.03003"
    param_formula = "n (option n_frequency)"
    suggested_lr = 1e-1
    option_defaults = {"n_frequency": 1000, "scaling": 150.0, "seed": 0}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        size = layer.out_features * layer.in_features
        n = self.options["n_frequency"]
        if not 1 <= n <= size:
            raise ValueError(f"fourierft n_frequency must be in [1, {size}] (out·in) for this layer, got {n}")
        g = torch.Generator().manual_seed(self.options["seed"])
        flat = torch.randperm(size, generator=g)[:n]
        self.register_buffer("freq_index", torch.stack([flat // layer.in_features, flat % layer.in_features]).to(
            layer.weight.device))
        self.fourier_c = nn.Parameter(torch.zeros(n, dtype=layer.weight.dtype, device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r is unused

    def expected_trainable_params(self) -> int:
        return self.fourier_c.numel()

    def delta_weight(self) -> torch.Tensor:
        spectrum = torch.zeros(self.layer.out_features, self.layer.in_features, dtype=torch.complex64,
                               device=self.fourier_c.device)
        spectrum[self.freq_index[0], self.freq_index[1]] = self.fourier_c.to(torch.complex64)
        return (self.options["scaling"] * torch.fft.ifft2(spectrum).real).to(self.fourier_c.dtype)
