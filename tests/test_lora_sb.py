"""LoRA-SB (arXiv 2411.19557): ΔW = s·B R A with B, A frozen orthonormal (W's singular vectors), R trained from 0."""

import torch
from method_harness import (
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from svd_ref import svd

import loralab as ll

SPEC = dict(method="lora-sb", r=3, alpha=6, targets=["layer"])


def test_lora_sb(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: 2.0 * svd(w)[0][:, :3] @ m.lora_R @ svd(w)[2][:3])
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 9)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)


def test_bases_orthonormal_and_start_at_zero():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear", randomize=False)
    torch.testing.assert_close(method.basis_B.T @ method.basis_B, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(method.basis_A @ method.basis_A.T, torch.eye(3), atol=1e-5, rtol=0)
    assert torch.count_nonzero(method.delta_weight()) == 0
