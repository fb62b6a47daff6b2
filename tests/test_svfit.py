"""SVFit (arXiv 2409.05926): ΔW = U_r diag(δ) V_rᵀ, only the top-r singular values move."""

import torch
from method_harness import (
    attached,
    base_matrix,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from svd_ref import svd

import loralab as ll

SPEC = dict(method="svfit", r=3, alpha=3, targets=["layer"])


def test_svfit(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: svd(w)[0][:, :3] @ torch.diag(m.lora_delta) @ svd(w)[2][:3])
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 3)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=5e-2)


def test_merged_singular_values_shift_exactly():
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    w = base_matrix(net)
    before = svd(w)[1]
    after = torch.linalg.svdvals(w + method.delta_weight().detach())
    shifted = torch.sort(torch.cat([before[:3] + method.lora_delta.detach(), before[3:]]), descending=True).values
    torch.testing.assert_close(after, shifted.abs().sort(descending=True).values, atol=1e-4, rtol=1e-4)
