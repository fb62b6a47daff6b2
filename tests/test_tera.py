"""TeRA: ΔW = unfold(G ×₁ U₁Λ₁ ×₂ U₂Λ₂ ×₃ U₃Λ₃ ×₄ U₄Λ₄) with frozen shared G, U_k and trained diagonals."""

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

SPEC = dict(method="tera", r=1, alpha=1, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def reference(m, w):
    """Mode products one at a time (out 10 = 2·5, in 12 = 3·4), independently of einsum's contraction."""
    key = "2x5x3x4"
    t = getattr(m.shared, f"core_{key}")
    for k in range(4):
        factor = getattr(m.shared, f"factor{k}_{key}") * m.tera_scales[k]
        t = torch.tensordot(factor, t.movedim(k, 0), dims=([1], [0])).movedim(0, k)
    return t.reshape(10, 12)


def test_tera(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 2 + 5 + 3 + 4, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=5e-2)


def test_high_rank_from_few_parameters():
    _, m = attached(ll.AdapterSpec(**SPEC), "linear")
    assert torch.linalg.matrix_rank(m.delta_weight().detach()) == 10  # full rank from 14 trained values
