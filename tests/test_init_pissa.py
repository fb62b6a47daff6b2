"""PiSSA (arXiv 2404.02948): W_res + s·BA = W, and s·BA is W's best rank-r approximation."""

import pytest
import torch
from init_harness import (
    check_output_unchanged_and_residual,
    check_saved_adapter_applies_to_original_base,
    init_model,
    singular,
)


def test_residual_plus_adapter_is_w():
    check_output_unchanged_and_residual("pissa")


def test_adapter_is_principal_part():
    original, _, methods = init_model("pissa")
    for path, method in methods:
        u, s, vh = singular(path, original)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(2.0 * method.lora_B @ method.lora_A, best, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_adapter_applies_to_original_base(tmp_path, rslora):
    check_saved_adapter_applies_to_original_base("pissa", tmp_path, rslora)
