"""Uni-LoRA (arXiv 2506.00799): LoRA parameters = init + P·θ with one θ for all layers, P isometric."""

import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from torch import nn

import loralab as ll

SPEC = dict(method="uni-lora", r=2, alpha=4, targets=["layer"], options={"dim": 64})
KINDS = ("linear", "hf-conv1d")


def reference(m, w):
    p = torch.zeros(m.shared.index.numel(), 64)
    p[torch.arange(m.shared.index.numel()), m.shared.index] = m.shared.weight
    flat = p @ m.shared.theta
    a = m.init_A + flat[m.part_a].view(2, w.shape[1])
    b = flat[m.part_b].view(w.shape[0], 2)
    return 2.0 * b @ a


def test_uni_lora(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 64, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=5e-2)


def test_projection_is_isometric_and_one_vector_serves_all_layers():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    ll.add_adapter(net, ll.AdapterSpec(method="uni-lora", r=2, targets=["0", "1"], options={"dim": 32}))
    shared = net[0].adapters["default"].shared
    assert shared is net[1].adapters["default"].shared
    assert ll.trainable_parameters(net).trainable == 32
    p = torch.zeros(shared.index.numel(), 32)
    p[torch.arange(shared.index.numel()), shared.index] = shared.weight
    used = p.abs().sum(0) > 0
    torch.testing.assert_close((p.T @ p)[used][:, used], torch.eye(int(used.sum())), atol=1e-6, rtol=0)
