"""MiLoRA (arXiv 2406.09044): the adapter starts on W's r smallest singular triplets."""

import torch
from init_harness import (
    check_output_unchanged_and_residual,
    check_saved_adapter_applies_to_original_base,
    init_model,
    singular,
)


def test_residual_plus_adapter_is_w():
    check_output_unchanged_and_residual("milora")


def test_adapter_is_minor_part():
    original, _, methods = init_model("milora")
    for path, method in methods:
        u, s, vh = singular(path, original)
        minor = u[:, -3:] @ torch.diag(s[-3:]) @ vh[-3:]
        torch.testing.assert_close(2.0 * method.lora_B @ method.lora_A, minor, atol=1e-5, rtol=1e-4)


def test_saved_adapter_applies_to_original_base(tmp_path):
    check_saved_adapter_applies_to_original_base("milora", tmp_path)
