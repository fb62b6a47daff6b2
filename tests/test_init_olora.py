"""OLoRA (arXiv 2406.01775): B has orthonormal columns from W = QR, and W_res + s·BA = W."""

import torch
from init_harness import check_output_unchanged_and_residual, check_saved_adapter_applies_to_original_base, init_model


def test_residual_plus_adapter_is_w():
    check_output_unchanged_and_residual("olora")


def test_b_columns_orthogonal_and_span_q():
    original, _, methods = init_model("olora")
    for path, method in methods:
        b = method.lora_B.detach()
        gram = b.T @ b
        torch.testing.assert_close(gram, gram[0, 0] * torch.eye(3), atol=1e-5, rtol=1e-4)
        q, _ = torch.linalg.qr(original.get_submodule(path).weight.detach())
        projector = q[:, :3] @ q[:, :3].T
        torch.testing.assert_close(projector @ b, b, atol=1e-5, rtol=1e-4)


def test_saved_adapter_applies_to_original_base(tmp_path):
    check_saved_adapter_applies_to_original_base("olora", tmp_path)
