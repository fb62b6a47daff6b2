"""LoRA (arXiv 2106.09685) and rsLoRA (arXiv 2312.03732) against ΔW = s·BA written here."""

import math

import pytest
import torch
from method_harness import (
    KINDS,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_dense_delta(rslora):
    spec = ll.AdapterSpec(method="lora", r=3, alpha=6, targets=["layer"], rslora=rslora)
    scale = 6 / math.sqrt(3) if rslora else 6 / 3
    check_forward(spec, lambda method, w: scale * method.lora_B @ method.lora_A)


def test_merge_unmerge_restores_weights():
    check_merge_roundtrip(ll.AdapterSpec(method="lora", r=3, alpha=6, targets=["layer"]))


def test_param_count_is_r_times_in_plus_out():
    check_param_count(ll.AdapterSpec(method="lora", r=3, targets=["layer"]), lambda i, o: 3 * (i + o))


def test_save_load_roundtrip(tmp_path):
    check_save_load(ll.AdapterSpec(method="lora", r=3, alpha=6, targets=["layer"]), tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_loss(kind):
    check_training_lowers_loss(ll.AdapterSpec(method="lora", r=4, alpha=8, targets=["layer"]), kind)


def test_starts_as_identity():
    from method_harness import Net

    net = Net("linear")
    x = net.sample()
    before = net(x)
    ll.add_adapter(net, ll.AdapterSpec(method="lora", r=2, targets=["layer"]))
    torch.testing.assert_close(net(x), before, atol=0, rtol=0)


def test_dropout_only_in_training():
    from method_harness import attached

    net, _ = attached(ll.AdapterSpec(method="lora", r=2, dropout=0.5, targets=["layer"]), "linear")
    x = net.sample()
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    net.train()
    assert not torch.allclose(net(x), net(x))
