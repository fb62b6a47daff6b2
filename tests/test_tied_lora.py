"""Tied-LoRA (arXiv 2311.09578): ΔW_l = s·diag(v_l)·B·diag(u_l)·A with A, B shared across layers."""

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

SPEC = dict(method="tied-lora", r=3, alpha=6, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def reference(m, w):
    (a, b) = m.tied()
    return 2.0 * torch.diag(m.lora_v) @ b @ torch.diag(m.lora_u) @ a


def test_tied_lora(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: o + 3 + 3 * (i + o), kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


def test_layers_of_one_shape_share_a_and_b(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    ll.add_adapter(net, ll.AdapterSpec(method="tied-lora", r=2, targets=["0", "2", "4"]))
    first, second, last = net[0].adapters["default"], net[2].adapters["default"], net[4].adapters["default"]
    assert first.tied()[0] is second.tied()[0] and first.tied()[0] is not last.tied()[0]
    # per layer out + r, shared r·(in + out) for each of the two shapes, counted once
    assert ll.trainable_parameters(net).trainable == (8 + 2) * 2 + (4 + 2) + 2 * (8 + 8) + 2 * (8 + 4)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = torch.randn(3, 8)
    ll.save_adapter(net, tmp_path)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in net.state_dict().items() if "adapters" not in k})
    ll.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), net(x))
