"""LoKr / KronA (arXiv 2212.10650): ΔW = s·C ⊗ (B A); the unmerged path uses the Kronecker identity."""

import pytest
import torch
from method_harness import (
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

SPEC = dict(method="lokr", r=1, alpha=2, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def kron(c, d):
    """Written out block by block, independently of torch.kron."""
    rows = [torch.cat([c[i, j] * d for j in range(c.shape[1])], dim=1) for i in range(c.shape[0])]
    return torch.cat(rows, dim=0)


def test_lokr(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: 2.0 * kron(m.lokr_C, m.lokr_B @ m.lokr_A), kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 2 * 3 + 1 * (5 + 4), kinds=KINDS)  # out 10 = 2·5, in 12 = 3·4
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


def test_factor_shapes_and_rank_check():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    assert (method.o1, method.o2, method.i1, method.i2) == (2, 5, 3, 4)
    with pytest.raises(ValueError, match="Kronecker block"):
        attached(ll.AdapterSpec(**{**SPEC, "r": 5}), "linear")
