"""Bone (arXiv 2409.15371): ΔW_ij = W_ij·B_j + B_j on r×r blocks, B shared down each column of blocks."""

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

SPEC = dict(method="bone", r=2, alpha=2, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def reference(m, w):
    delta = torch.zeros_like(w)
    for i in range(w.shape[0] // 2):
        for j in range(w.shape[1] // 2):
            block = w[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            delta[2 * i:2 * i + 2, 2 * j:2 * j + 2] = block @ m.bone_B[j] + m.bone_B[j]
    return delta


def test_bone(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: i * 2, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


def test_r_must_divide_the_layer():
    with pytest.raises(ValueError, match="divide"):
        attached(ll.AdapterSpec(**{**SPEC, "r": 5}), "linear")  # in = 12
