"""VB-LoRA (arXiv 2405.15179): every length-b piece of A and B is a top-k softmax mixture of one shared bank."""

import pytest
import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

OPTS = {"bank_size": 6, "vector_length": 2, "top_k": 2}
SPEC = dict(method="vb-lora", r=2, alpha=4, targets=["layer"], options=OPTS)
KINDS = ("linear", "hf-conv1d")


def mix(logits, bank):
    rows = []
    for row in logits:  # one piece at a time: the two largest logits, softmax over just those
        order = sorted(range(len(row)), key=lambda j: -row[j].item())[:2]
        weights = torch.softmax(row[order], dim=0)
        rows.append(weights[0] * bank[order[0]] + weights[1] * bank[order[1]])
    return torch.stack(rows)


def reference(m, w):
    a = mix(m.logits_A, m.shared.bank).reshape(2, w.shape[1])
    b = mix(m.logits_B, m.shared.bank).reshape(2, w.shape[0]).T
    return 2.0 * b @ a


def test_vb_lora(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 6 * 2 + 6 * 2 * (i + o) // 2, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=5e-2)


def test_auto_vector_length_is_the_largest_power_of_two_dividing_every_layer():
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384), torch.nn.Linear(384, 96))
    ll.add_adapter(model, ll.AdapterSpec(method="vb-lora", r=4, targets="all-linear"))
    method = model[0].adapters["default"]
    assert method.shared.bank.shape == (256, 32)  # 96 = 3·32 caps it; 64 does not divide 96
    assert method.logits_A.shape == (4 * 384 // 32, 256)
    assert method.shared.bank.abs().max() <= 0.02  # the authors' bound: ΔW starts small


def test_a_vector_length_that_does_not_divide_a_layer_is_refused_by_size():
    model = torch.nn.Sequential(torch.nn.Linear(384, 96))
    with pytest.raises(ValueError, match=r"vector_length=64 .* does not divide \[96\]"):
        ll.add_adapter(model, ll.AdapterSpec(method="vb-lora", r=4, targets="all-linear",
                                             options={"vector_length": 64}))
