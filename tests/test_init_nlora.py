"""NLoRA: the Nyström sketch W Ω (Ψᵀ W Ω)⁺ Ψᵀ W; exact for a W of rank ≤ r; W_res + BA = W."""

import torch
from init_harness import check_output_unchanged_and_residual, check_saved_adapter_applies_to_original_base
from torch import nn

import loralab as ll
from loralab.model import methods_of


def test_residual_plus_adapter_is_w():
    check_output_unchanged_and_residual("nlora")


def test_saved_adapter_applies_to_original_base(tmp_path):
    check_saved_adapter_applies_to_original_base("nlora", tmp_path)


def test_low_rank_weight_captured_exactly():
    layer = nn.Linear(12, 10, bias=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, 3, generator=g) @ torch.randn(3, 12, generator=g))
    w = layer.weight.detach().clone()
    net = nn.Sequential(layer)
    ll.add_adapter(net, ll.AdapterSpec(r=3, alpha=3, targets=["0"], init="nlora"))
    (_, method), = list(methods_of(net, "default"))
    torch.testing.assert_close(method.lora_B @ method.lora_A, w, atol=1e-4, rtol=1e-4)
    assert net[0].base_layer.weight.abs().max() < 1e-4
