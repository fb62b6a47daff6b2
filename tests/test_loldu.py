"""LoLDU (arXiv 2410.13618): frozen P·L_r and U_r from W's LU; ΔW = (P L_r) diag(σz − D_r) U_r."""

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

SPEC = dict(method="loldu", r=3, alpha=3, targets=["layer"])
KINDS = ("linear", "hf-conv1d", "conv")


def reference(m, w):
    p, lower, upper = torch.linalg.lu(w.double())
    d = torch.diagonal(upper)[:3]
    left = (p @ lower)[:, :3]
    right = upper[:3] / d[:, None]
    return (left @ torch.diag(m.lora_sigma.double() * m.lora_diag.double() - d) @ right).float()


def test_loldu(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 3 + 1, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=3e-2)


def test_starts_unchanged():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear", randomize=False)
    assert torch.count_nonzero(method.delta_weight()) == 0
