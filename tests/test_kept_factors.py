"""A factored method's assembled factors (VB-LoRA's mixtures, VeRA's scaled bases, …) are kept between
forwards without gradients in eval mode, and assembled afresh once any tensor they come from changes."""

import pytest
import torch
from method_harness import Stack, randomise_trainables

import loralab as ll
from loralab.methods.base import METHODS, FactoredMethod
from loralab.model import methods_of

FACTORED = sorted(name for name, cls in METHODS.items() if issubclass(cls, FactoredMethod))
OPTIONS = {"vb-lora": {"vector_length": 4}, "mos": {"shard_length": 4}}
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def adapted(method: str) -> torch.nn.Module:
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(method=method, r=2, targets=["a", "b", "c"], options=OPTIONS.get(method, {})))
    randomise_trainables(net)
    return net


def counting(net: torch.nn.Module) -> list[int]:
    calls = [0]
    for _, method in methods_of(net, "default"):
        original = method.factors

        def factors(original=original):
            calls[0] += 1
            return original()

        method.factors = factors
    return calls


def test_every_factored_method_is_covered():
    assert {"vb-lora", "vera", "uni-lora", "nola", "mos", "tied-lora", "randlora"} <= set(FACTORED)


@pytest.mark.parametrize("method", FACTORED)
def test_kept_factors_give_the_same_output_and_are_assembled_once(method):
    net = adapted(method).eval()
    fresh = net(X).detach()  # gradients recorded: assembled each call
    calls = counting(net)
    with torch.no_grad():
        first, second = net(X), net(X)
    torch.testing.assert_close(first, fresh, atol=0, rtol=0)
    torch.testing.assert_close(second, fresh, atol=0, rtol=0)
    assert calls[0] == 3  # once per layer, for both forwards


@pytest.mark.parametrize("method", FACTORED)
def test_a_changed_parameter_is_seen(method):
    net = adapted(method).eval()
    with torch.no_grad():
        before = net(X)
        for p in net.parameters():
            if p.requires_grad:
                p.mul_(1.5)  # every trained tensor, shared ones included
        after = net(X)
    net.train()
    torch.testing.assert_close(after, net(X).detach(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(after, before)


def test_training_mode_and_gradients_assemble_each_call():
    net = adapted("vb-lora")
    calls = counting(net)
    with torch.no_grad():
        net(X), net(X)  # train mode: not kept
    net.eval()
    net(X), net(X)  # gradients recorded: not kept
    assert calls[0] == 12
