"""NOLA (arXiv 2310.02556): A = Σ α_i A_i, B = Σ β_j B_j over frozen random bases; ΔW = s·B A."""

import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

SPEC = dict(method="nola", r=2, alpha=4, targets=["layer"], options={"num_basis_a": 5, "num_basis_b": 7})


def reference(m, w):
    a = sum(m.nola_alpha[i] * m.basis_A[i] for i in range(5))
    b = sum(m.nola_beta[j] * m.basis_B[j] for j in range(7))
    return 2.0 * b @ a


def test_nola(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 5 + 7)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=5e-2)
    assert torch.count_nonzero(reference(*_fresh())) == 0


def _fresh():
    from method_harness import attached

    _, m = attached(ll.AdapterSpec(**SPEC), "linear", randomize=False)
    return m, None
