"""LoHa (FedPara, arXiv 2108.06098): ΔW = s·(B₁A₁) ⊙ (B₂A₂); rank can exceed r."""

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

SPEC = dict(method="loha", r=2, alpha=4, targets=["layer"])


def test_loha(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: 2.0 * (m.hada_B1 @ m.hada_A1) * (m.hada_B2 @ m.hada_A2))
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 2 * 2 * (i + o))
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec)


def test_rank_beyond_r():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    assert torch.linalg.matrix_rank(method.delta_weight().detach()) == 4  # r² with r = 2
