"""FourierFT: parameter-efficient fine-tuning with the discrete Fourier transform (Gao et al., arXiv 2405.03003).

n spectral coefficients c at fixed random frequencies (seeded) are trained; the update is
the real part of the inverse 2-D DFT of the otherwise-zero spectrum F:
    ΔW = α · Re(IDFT2(F)),  F[u_k, v_k] = c_k,
with α the option `scaling` (the paper's default 150 for roughly unit-variance weights).
c starts at zero. The frequencies are PEFT's: the first n of torch.randperm(out·in) drawn from a CPU
generator seeded with option `seed`, entry f at row f // in, column f % in of the [out, in] spectrum.

Saved in PEFT's FourierFT format: per layer only `fourierft_spectrum` [n] (c); the config's `n_frequency`,
`scaling` and `random_loc_seed` (option `seed`) let both libraries regenerate the frequencies. PEFT's
per-layer `n_frequency_pattern` has no loralab counterpart, so a file that gives some layer another n is
refused. PEFT's FourierFT has no dropout: `dropout` (training only) is not kept in the file. PEFT's
FourierFT takes nn.Linear and GPT-2's Conv1D only: a FourierFT on nn.Conv2d or nn.Embedding is read by
loralab alone. Files in loralab's old layout (`fourier_c`, `freq_index`, peft_type LORALAB) are read too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec

PEFT_DEFAULTS = {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777}  # where a PEFT config lacks them


@METHODS.register("fourierft")
class FourierFT(AdapterMethod):
    name = "fourierft"
    summary = "n trained spectral coefficients; ΔW = α·Re(IDFT2) of the sparse spectrum"
    paper = "2405.03003"
    param_formula = "n (option n_frequency)"
    peft_type = "FOURIERFT"
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
        index = torch.stack([flat // layer.in_features, flat % layer.in_features]).to(layer.weight.device)
        self.register_buffer("freq_index", index, persistent=False)  # regenerated from the seed, never saved
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n, dtype=layer.weight.dtype, device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r is unused

    def expected_trainable_params(self) -> int:
        return self.fourierft_spectrum.numel()

    def delta_weight(self) -> torch.Tensor:
        c = self.fourierft_spectrum
        spectrum = torch.zeros(self.layer.out_features, self.layer.in_features, dtype=torch.complex64, device=c.device)
        spectrum[self.freq_index[0], self.freq_index[1]] = c.to(torch.complex64)
        return (self.options["scaling"] * torch.fft.ifft2(spectrum).real).to(c.dtype)

    # ---- PEFT's FourierFT format -----------------------------------------------------------
    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Reads PEFT's `fourierft_spectrum`, or loralab's old layout (`fourier_c` and the frequencies
        `freq_index`, which must be the ones the seed gives)."""
        if "fourierft_spectrum" in tensors or "fourier_c" not in tensors:
            super().from_saved(tensors, where)
            return
        index = tensors.get("freq_index")
        if index is None or not torch.equal(index.to(self.freq_index), self.freq_index):
            raise ValueError(f"{where}.freq_index is missing or is not the frequencies that seed "
                             f"{self.options['seed']} gives (n_frequency={self.options['n_frequency']})")
        super().from_saved({"fourierft_spectrum": tensors["fourier_c"]}, where)

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        return {"peft_type": "FOURIERFT", "n_frequency": options["n_frequency"], "scaling": options["scaling"],
                "random_loc_seed": options["seed"], "n_frequency_pattern": {}, "init_weights": True,
                "bias": "fourier_only" if spec.bias == "lora_only" else spec.bias}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        n = int(config.get("n_frequency", PEFT_DEFAULTS["n_frequency"]))
        others = {k: v for k, v in (config.get("n_frequency_pattern") or {}).items() if v != n}
        if others:
            raise ValueError(f"this FourierFT adapter gives some layers another n_frequency (n_frequency_pattern "
                             f"{others}), which loralab's fourierft does not have; loralab reads FourierFT adapters "
                             f"with one n_frequency ({n}) for every layer")
        options = {"n_frequency": n, "scaling": float(config.get("scaling", PEFT_DEFAULTS["scaling"])),
                   "seed": int(config.get("random_loc_seed", PEFT_DEFAULTS["random_loc_seed"]))}
        bias = config.get("bias") or "none"  # PEFT's own "fourier_only" is loralab's "lora_only"
        return {"method": "fourierft", "r": 1, "options": options,
                "bias": "lora_only" if bias.endswith("_only") else bias}
