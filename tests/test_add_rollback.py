"""An add_adapter that fails after planning (in its initialiser, or stopped with Ctrl-C there) leaves the
model as it was: no wrappers, no adapter state, the base weights and requires_grad flags it had, replicated
blocks undone; and the same name can be added again."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
import loralab.inits.pissa as pissa_module
from loralab.model import wrappers


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    model[4].weight.requires_grad_(False)  # the user's own choice, to be kept
    return model


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {k: (p.detach().clone(), p.requires_grad) for k, p in model.named_parameters()}


def assert_params_as_before(model: nn.Module, before: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """The same parameters, values (to float rounding) and requires_grad flags."""
    after = snapshot(model)
    assert list(after) == list(before)
    for key, (value, flag) in before.items():
        torch.testing.assert_close(after[key][0], value, rtol=0, atol=1e-6, msg=key)
        assert after[key][1] == flag, key


def test_failing_initialiser_leaves_nothing_and_the_name_free() -> None:
    model = mlp()
    before = snapshot(model)
    x = torch.randn(3, 8)
    expected = model(x)
    with pytest.raises(ValueError, match="lora-ga needs 2r"):  # 2r > 6 on the 6x8 layer: checked by the init itself
        ll.add_adapter(model, ll.AdapterSpec(init="lora-ga", r=4, targets=["0", "2"]),
                       calibration=[{"input": torch.randn(2, 8)}])
    assert not list(wrappers(model))
    assert ll.adapter_names(model) == []
    assert_params_as_before(model, before)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["0", "2"]))
    assert ll.adapter_names(model) == ["default"]


def test_ctrl_c_midway_through_pissa_gives_the_base_weights_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["4"]), name="kept")  # an adapter already there stays
    kept_before = snapshot(model)
    calls = []
    real = pissa_module.top_singular

    def interrupted(w: torch.Tensor, r: int, largest: bool = True):
        calls.append(w.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(w, r, largest)

    monkeypatch.setattr(pissa_module, "top_singular", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ll.add_adapter(model, ll.AdapterSpec(init="pissa", r=2, targets=["0", "2"]), name="new")
    assert len(calls) == 2  # the first layer's base had been rewritten to its residual
    assert ll.adapter_names(model) == ["kept"]
    assert [p for p, _ in wrappers(model)] == ["4"]
    assert_params_as_before(model, kept_before)


def test_failed_first_adapter_undoes_its_layer_replication() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    blocks, ranges = model.model.layers, [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="needs calibration data"):
        ll.add_adapter(model, ll.AdapterSpec(init="lora-ga", r=2, targets=["q_proj"], layer_replication=ranges))
    assert model.model.layers is blocks and len(model.model.layers) == 3
    assert model.config.num_hidden_layers == 3
    assert not list(wrappers(model))
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets=["q_proj"], layer_replication=ranges))
    assert len(model.model.layers) == 4
