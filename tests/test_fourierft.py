"""FourierFT (arXiv 2405.03003): ΔW = α·Re(IDFT2(F)) with n trained coefficients at fixed frequencies."""

import cmath

import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

SPEC = dict(method="fourierft", r=1, targets=["layer"], options={"n_frequency": 20, "scaling": 10.0})


def reference(m, w):
    """The inverse DFT written as a sum of the n sinusoids, not with torch.fft."""
    out, inp = w.shape
    rows = torch.arange(out)[:, None].double()
    cols = torch.arange(inp)[None, :].double()
    total = torch.zeros(out, inp, dtype=torch.double)
    for (u, v), c in zip(m.freq_index.T.tolist(), m.fourier_c.tolist()):
        phase = 2 * cmath.pi * (u * rows / out + v * cols / inp)
        total += c * torch.cos(phase)
    return (10.0 * total / (out * inp)).float()


def test_fourierft(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 20)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=1.0)
