"""WaRA (arXiv 2506.24092): ΔW = H_outᵀ (s·BA) H_in with orthonormal one-level Haar matrices built here."""

import math

import pytest
import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

SPEC = dict(method="wara", r=3, alpha=6, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def haar(n):
    """Averages then differences of neighbouring pairs, normalised: written independently here."""
    rows = []
    for k in range(n // 2):
        row = [0.0] * n
        row[2 * k] = row[2 * k + 1] = 1 / math.sqrt(2)
        rows.append(row)
    for k in range(n // 2):
        row = [0.0] * n
        row[2 * k], row[2 * k + 1] = 1 / math.sqrt(2), -1 / math.sqrt(2)
        rows.append(row)
    return torch.tensor(rows)


def test_wara(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: haar(10).T @ (2.0 * m.lora_B @ m.lora_A) @ haar(12), kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 3 * (i + o), kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)
    torch.testing.assert_close(haar(12) @ haar(12).T, torch.eye(12), atol=1e-6, rtol=0)


def test_odd_size_refused():
    from method_harness import attached

    with pytest.raises(ValueError, match="even size"):
        attached(ll.AdapterSpec(**SPEC), "conv")  # in = 3·3·3 = 27
