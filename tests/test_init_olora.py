"""OLoRA (arXiv 2406.01775): B = Q[:, :r] and A = R[:r] from W = QR, and W_res + s·BA = W."""

import torch
from init_harness import check_output_unchanged_and_residual, check_saved_adapter_applies_to_original_base, init_model


def test_residual_plus_adapter_is_w():
    check_output_unchanged_and_residual("olora")


def test_b_is_q_and_a_is_r_unscaled():
    """B = Q[:, :r] (orthonormal), A = R[:r], as in the paper and PEFT: the scale is not split into them."""
    original, _, methods = init_model("olora")
    for path, method in methods:
        assert method.scale != 1  # so a split scale would show
        q, r = torch.linalg.qr(original.get_submodule(path).weight.detach())
        torch.testing.assert_close(method.lora_B.detach(), q[:, :3], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(method.lora_A.detach(), r[:3], atol=1e-5, rtol=1e-4)


def test_saved_adapter_applies_to_original_base(tmp_path):
    check_saved_adapter_applies_to_original_base("olora", tmp_path)
