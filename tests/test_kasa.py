"""KaSA (arXiv 2412.06071): ΔW = −(W's r minor SVD components) + s·ΔU diag(Δσ) ΔV."""

from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from svd_ref import svd

import loralab as ll

SPEC = dict(method="kasa", r=2, alpha=4, targets=["layer"])


def reference(m, w):
    u, s, vh = svd(w)
    minor = u[:, -2:] @ (s[-2:, None] * vh[-2:])
    return 2.0 * (m.kasa_U * m.kasa_sigma) @ m.kasa_V - minor


def test_kasa(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 2 * (i + o) + 2)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)
