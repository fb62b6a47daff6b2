"""LoRA-XS (arXiv 2405.17604): ΔW = s·(U_r S_r) R V_rᵀ with only R (r×r) trained."""

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

SPEC = dict(method="lora-xs", r=3, alpha=6, targets=["layer"])


def reference(method, w):
    u, s, vh = svd(w)
    return 2.0 * (u[:, :3] * s[:3]) @ method.lora_R @ vh[:3]


def test_lora_xs(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 9)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)


def test_only_r_trains():
    from method_harness import attached

    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["layer.adapters.a.lora_R"]
    assert torch.count_nonzero(method.basis_A) > 0
