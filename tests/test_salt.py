"""SALT (arXiv 2503.16055): scale/shift the top-r singular values, LoRA inside the remaining subspace."""

import pytest
import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from svd_ref import svd

import loralab as ll

SPEC = dict(method="salt", r=3, alpha=4, targets=["layer"], options={"lora_rank": 2})


def reference(m, w):
    u, s, vh = svd(w)
    top = u[:, :3] @ torch.diag(m.lora_scale * s[:3] + m.lora_shift - s[:3]) @ vh[:3]
    low = u[:, 3:] @ ((4 / 3) * m.lora_B @ m.lora_A) @ vh[3:]
    return top + low


def test_salt(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 2 * 3 + 2 * 2 * (min(i, o) - 3))
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)


def test_lora_rank_must_fit_remaining_subspace():
    from method_harness import attached

    with pytest.raises(ValueError, match="lora_rank must be in"):
        attached(ll.AdapterSpec(**{**SPEC, "options": {"lora_rank": 50}}), "linear")
