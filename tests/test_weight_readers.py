"""Code that reads an adapted layer's weight instead of calling it (nn.MultiheadAttention reads its out_proj's)
gets W + ΔW: the layer's own forward, computed from `layer.weight` and `layer.bias`, is the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab as ll
from loralab.methods.base import METHODS

CASES = {  # layer kind → (a fresh layer, an input, the layer's operation from its weight and bias)
    "linear": (lambda: nn.Linear(6, 5), torch.randn(3, 6), lambda m, x: F.linear(x, m.weight, m.bias)),
    "conv": (lambda: nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5),
             lambda m, x: F.conv2d(x, m.weight, m.bias, padding=1)),
    "embedding": (lambda: nn.Embedding(10, 4), torch.tensor([[1, 2, 9]]), lambda m, x: F.embedding(x, m.weight)),
    "hf-conv1d": (lambda: Conv1D(5, 6), torch.randn(3, 6), lambda m, x: x @ m.weight + m.bias),
}


METHOD_OPTIONS = {"lora": {}, "dora": {}, "ia3": {"scale_bias": True}}
PAIRS = [(kind, method) for method in METHOD_OPTIONS for kind in sorted(CASES)
         if kind in METHODS.get(method).layer_kinds]


@pytest.mark.parametrize("kind,method", PAIRS)
def test_the_weight_read_directly_computes_what_the_layer_does(kind, method):
    torch.manual_seed(0)
    make, x, by_weight = CASES[kind]
    options = METHOD_OPTIONS[method]
    spec = ll.AdapterSpec(method=method, r=2, targets=["0"], options=options)
    net = ll.add_adapter(nn.Sequential(make()), spec)
    with torch.no_grad():
        for _, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.3)
        adapted = net[0]
        assert (adapted.weight - adapted.base_layer.weight).abs().max() > 1e-3
        torch.testing.assert_close(by_weight(adapted, x), adapted(x), atol=1e-5, rtol=1e-5)
        with ll.disabled(net):
            assert adapted.weight is adapted.base_layer.weight
