"""Adapters on torch's nn.MultiheadAttention (nn.TransformerEncoder, torchvision's ViT, open_clip).

The attention never calls its out_proj (it reads out_proj.weight) and holds its input projection as a
bare parameter, so an adapter works there only through the weights. The reference is the dense one:
a copy of the model with W + s·B·A written into in_proj_weight and out_proj.weight (and each linear
layer's weight). PEFT's layout for such adapters (target the attention: its in_proj and its out_proj)
is checked both ways with out_proj's B at zero, because PEFT 0.21 adds out_proj's ΔW twice in its
forward (huggingface/peft#3774), which the dense reference shows."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loralab as ll
from loralab.model import _with_attention_outputs, adapted_layers
from loralab.targets import resolve_targets

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


def randomise_b(model: nn.Module, seed: int = 2, skip: str | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and not (skip and skip in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def dense(ours: nn.Module) -> nn.Module:
    """A plain copy of the base with every adapted layer's W + ΔW written in."""
    ref = Net()
    with torch.no_grad():
        for path, layer in adapted_layers(ours):
            target = ref.get_submodule(path.replace(".base_layer", ""))
            weight = target.in_proj_weight if isinstance(target, nn.MultiheadAttention) else target.weight
            weight += layer.adapters["default"].delta_weight()
    return ref


@pytest.mark.parametrize("targets", [["self_attn", "linear1"], "all-linear"])
def test_outputs_and_gradients_equal_the_dense_reference(targets):
    ours = ll.add_adapter(Net(), ll.AdapterSpec(r=2, alpha=4, targets=targets))
    randomise_b(ours)
    ref = dense(ours)
    torch.testing.assert_close(ours(X), ref(X))
    ours(X).square().sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    out_proj_b = [g for n, g in grads.items() if "out_proj" in n and "lora_A" in n]
    assert out_proj_b and all(g.abs().max() > 0 for g in out_proj_b)  # out_proj's adapter trains
    if targets != "all-linear":
        assert any("self_attn.adapters" in n for n in grads)  # the packed input projection is adapted
    with torch.no_grad():  # eval: nn.TransformerEncoder's fast path reads the weights, and gets the adapted ones
        torch.testing.assert_close(ours.eval()(X), ref.eval()(X))


def test_merge_unmerge_and_unload():
    ours = ll.add_adapter(Net(), ll.AdapterSpec(r=2, targets=["self_attn"]))
    randomise_b(ours)
    with torch.no_grad():
        want = ours(X)
        ll.merge(ours)
        torch.testing.assert_close(ours(X), want)
        ll.unmerge(ours)
        base = ours.enc.layers[0].self_attn.base_layer  # (the wrapper's in_proj_weight is the adapted one)
        torch.testing.assert_close(base.in_proj_weight, Net().enc.layers[0].self_attn.in_proj_weight)
        plain = ll.merge_and_unload(ours)
        assert type(plain.enc.layers[0].self_attn) is nn.MultiheadAttention
        assert type(plain.enc.layers[0].self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        torch.testing.assert_close(plain(X), want)


def test_remove_restores_the_plain_attention():
    model = ll.add_adapter(Net(), ll.AdapterSpec(r=2, targets=["self_attn"]))
    ll.remove_adapter(model, "default")
    assert type(model.enc.layers[1].self_attn) is nn.MultiheadAttention
    assert type(model.enc.layers[1].self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_out_proj_named_beside_its_attention_is_adapted_once():
    model = ll.add_adapter(Net(), ll.AdapterSpec(r=2, targets=["self_attn", "out_proj"]))
    paths = [p for p, _ in adapted_layers(model)]
    assert sorted(paths) == sorted(f"enc.layers.{i}.self_attn{s}" for i in (0, 1) for s in ("", ".base_layer.out_proj"))
    assert ll.trainable_parameters(model).trainable == 2 * (2 * (16 + 48) + 2 * (16 + 16))  # no second copy
    chosen = _with_attention_outputs(Net(), resolve_targets(Net(), ["self_attn", "out_proj"]))
    assert not any(p.endswith("self_attn.out_proj") for p in chosen)  # one method built per layer
    assert set(model.enc.layers[0].self_attn._modules) == {"base_layer", "adapters"}


@pytest.mark.parametrize("ranks", [{}, {"layers.1.self_attn": 4}])
def test_peft_files_both_ways(tmp_path, ranks):
    """With a rank_pattern key for an attention, its out_proj takes that rank too (as in PEFT)."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["self_attn", "linear1"], rank_pattern=ranks)
    theirs = get_peft_model(Net(), config)
    randomise_b(theirs, skip="out_proj")  # PEFT counts out_proj's ΔW twice (see the module docstring)
    with torch.no_grad():
        want = theirs(X)
        theirs.save_pretrained(tmp_path / "peft")
        ours = ll.load_adapter(Net(), tmp_path / "peft")
        torch.testing.assert_close(ours(X), want)
        ll.save_adapter(ours, tmp_path / "ours")
        assert set(ll.read_tensors(tmp_path / "ours")) == set(ll.read_tensors(tmp_path / "peft"))
        saved = ll.read_config(tmp_path / "ours")
        assert sorted(saved["target_modules"]) == ["linear1", "self_attn"]
        assert not any(k.endswith("out_proj") for k in saved["rank_pattern"])  # it follows its attention
        assert ll.read_tensors(tmp_path / "ours")["enc.layers.1.self_attn.base_layer.out_proj.lora_A.weight"].shape[0] \
            == (4 if ranks else 2)
        back = PeftModel.from_pretrained(Net(), tmp_path / "ours").train()  # (dropout 0: train mode is exact)
        torch.testing.assert_close(back(X), want)  # in eval, nn.TransformerEncoder's fast path skips PEFT's adapter


def test_mixed_batches_through_an_attention_are_refused():
    model = ll.add_adapter(Net(), ll.AdapterSpec(r=2, targets=["self_attn"]))
    randomise_b(model)
    with pytest.raises(RuntimeError, match="mixed-adapter batches are not supported through nn.MultiheadAttention"):
        model(X, adapter_names=["default", None])
    with torch.no_grad(), ll.disabled(copy.deepcopy(model)) as base:
        torch.testing.assert_close(model(X, adapter_names=[None, None]), base(X))  # base rows need no adapter


def test_attention_with_its_own_key_and_value_widths_is_refused():
    net = nn.Sequential(nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="query, key and value of one width"):
        ll.add_adapter(net, ll.AdapterSpec(r=2, targets=["0"]))


def test_dropout_on_an_attention_is_named_as_not_applying():
    with pytest.warns(UserWarning, match="dropout=0.1 does not apply to the adapters of nn.MultiheadAttention"):
        ll.add_adapter(Net(), ll.AdapterSpec(r=2, dropout=0.1, targets=["self_attn", "linear1"]))
