"""RandLoRA (arXiv 2502.00987): ΔW = s·Σ_i B_i diag(λ_i) A_i diag(γ_i), full rank from frozen random bases."""

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

SPEC = dict(method="randlora", r=3, alpha=6, targets=["layer"])


def reference(m, w):
    total = 0
    for i in range(m.bases_B.shape[0]):
        total = total + m.bases_B[i] @ torch.diag(m.lora_lambda[i]) @ m.bases_A[i] @ torch.diag(m.lora_gamma[i])
    return 2.0 * total


def test_randlora(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: -(-min(i, o) // 3) * (3 + i))
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)


def test_update_reaches_full_rank():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    assert torch.linalg.matrix_rank(method.delta_weight().detach()) == 10  # min(in=12, out=10), with r=3
