"""LoRA's lora_bias option (PEFT's `lora_bias=True`): y = x(W + sBA)ᵀ + b + s·b_lora written here from
the definition, its gradients, merging into the layer's bias, mixed-adapter rows, and files both ways
against `peft` itself."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loralab as ll

SPEC = dict(r=4, alpha=6.0, targets=["a", "conv"], options={"lora_bias": True})


class Net(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 6, bias=bias)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [batch, length, 8]
        h = torch.tanh(self.a(x)).transpose(1, 2)
        return self.head(torch.tanh(self.conv(h)).transpose(1, 2))


def trained_like(model: nn.Module) -> None:
    """Non-zero B and lora biases (both start at zero)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_bias" in n:
                p.normal_()


def adapted(**spec) -> tuple[Net, Net]:
    base = Net()
    model = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(**{**SPEC, **spec}))
    trained_like(model)
    return base, model


def reference(base: Net, model: Net, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    a, conv = model.a.adapters[name], model.conv.adapters[name]
    w_a = base.a.weight + a.scale * a.lora_B @ a.lora_A
    h = torch.tanh(F.linear(x, w_a, base.a.bias + a.scale * a.lora_bias)).transpose(1, 2)
    w_c = base.conv.weight + conv.scale * (conv.lora_B @ conv.lora_A).view_as(base.conv.weight)
    h = torch.tanh(F.conv1d(h, w_c, base.conv.bias + conv.scale * conv.lora_bias, padding=1)).transpose(1, 2)
    return base.head(h)


def test_output_and_gradients_equal_the_definition():
    base, model = adapted()
    x = torch.randn(3, 7, 8, requires_grad=True)
    y, ref = model(x), reference(base, model, x)
    torch.testing.assert_close(y, ref)
    wrt = [x] + [p for p in model.parameters() if p.requires_grad]
    assert sum("lora_bias" in n for n, p in model.named_parameters() if p.requires_grad) == 2
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(ref, wrt, dy)):
        torch.testing.assert_close(got, want)
    assert ll.trainable_parameters(model).trainable == 4 * (8 + 6) + 6 + 4 * (6 * 3 + 5) + 5


def test_merge_adds_it_to_the_bias_and_unmerge_restores_it():
    base, model = adapted()
    x = torch.randn(3, 7, 8)
    want = model(x)
    ll.merge(model)
    torch.testing.assert_close(model(x), want)
    ll.unmerge(model)
    torch.testing.assert_close(model.a.base_layer.bias, base.a.bias)
    torch.testing.assert_close(model.conv.base_layer.weight, base.conv.weight)
    plain = ll.merge_and_unload(model)
    torch.testing.assert_close(plain(x), want)


def test_mixed_rows_each_equal_their_adapter_alone():
    base, model = adapted()
    ll.add_adapter(model, ll.AdapterSpec(**SPEC), name="other")
    trained_like(model)
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", None, "other"])
        torch.testing.assert_close(mixed[0], reference(base, model, x, "default")[0])
        torch.testing.assert_close(mixed[1], base(x)[1])
        torch.testing.assert_close(mixed[2], reference(base, model, x, "other")[2])


def test_a_layer_without_a_bias_trains_it_but_cannot_merge_it():
    model = ll.add_adapter(Net(bias=False), ll.AdapterSpec(**{**SPEC, "targets": ["a"]}))
    trained_like(model)
    model(torch.randn(2, 3, 8)).sum().backward()
    assert model.a.adapters["default"].lora_bias.grad is not None
    with pytest.raises(RuntimeError, match="without a bias"):
        ll.merge(model)


@pytest.mark.parametrize(("spec", "message"), [
    (dict(method="dora", targets=["a"]), "does not work with DoRA"),
])
def test_refused_where_peft_refuses_it(spec, message):
    with pytest.raises(ValueError, match=message):
        ll.add_adapter(Net(), ll.AdapterSpec(**{**SPEC, **spec}))


def test_an_embedding_refuses_it():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="does not apply to embedding"):
        ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["0"], options={"lora_bias": True}))


def test_files_both_ways_against_peft(tmp_path):
    x = torch.randn(3, 7, 8)
    base, model = adapted()
    ll.save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(Net(), tmp_path / "ours")
    torch.testing.assert_close(theirs(x), model(x))
    peft_model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=6, target_modules=["a", "conv"], lora_bias=True))
    trained_like(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = ll.load_adapter(Net(), tmp_path / "peft")
    torch.testing.assert_close(loaded(x), peft_model(x))
    assert not torch.allclose(loaded(x), base(x))
