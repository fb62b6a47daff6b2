"""FLoRA (arXiv 2405.14739): Tucker update with a trained core, kernel modes kept for convolutions."""

import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

SPEC = dict(method="flora-tucker", r=3, alpha=6, targets=["layer"])
KINDS = ("linear", "hf-conv1d", "conv")


def reference(m, w):
    if m.lora_core.dim() == 2:
        return 2.0 * m.lora_B @ m.lora_core @ m.lora_A
    out, k = m.lora_B.shape[0], m.lora_core.shape[2:]
    kernel = torch.zeros(out, m.lora_A.shape[1], *k)
    for a in range(k[0]):
        for b in range(k[1]):  # each spatial tap is its own B·G[:, :, a, b]·A
            kernel[:, :, a, b] = m.lora_B @ m.lora_core[:, :, a, b] @ m.lora_A
    return 2.0 * kernel.reshape(out, -1)


def test_flora_tucker(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 3 * (o + (3 if i == 27 else i)) + 9 * (9 if i == 27 else 1), kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)
    check_training_lowers_loss(spec, kind="conv")
