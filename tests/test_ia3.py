"""(IA)³ (arXiv 2205.05638): y = l ⊙ (W x) + b, or W (l ⊙ x) + b for feed-forward layers."""

import json

import pytest
import torch
from method_harness import (
    Net,
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from old_layout import old_loralab_config
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab as ll
from loralab.model import methods_of

KINDS = ("linear", "hf-conv1d")


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3(feedforward):
    spec = ll.AdapterSpec(method="ia3", r=1, targets=["layer"], options={"feedforward": feedforward})
    if feedforward:
        check_forward(spec, lambda m, w: w * m.ia3_l - w, kinds=KINDS)
    else:
        check_forward(spec, lambda m, w: m.ia3_l[:, None] * w - w, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, (lambda i, o: i) if feedforward else (lambda i, o: o), kinds=KINDS)
    check_training_lowers_loss(spec)


@pytest.mark.parametrize("options", [{"feedforward": True}, {"scale_bias": True}])
def test_save_load(tmp_path, options):
    check_save_load(ll.AdapterSpec(method="ia3", r=1, targets=["layer"], options=options), tmp_path, kinds=KINDS)


def test_bias_not_scaled():
    net, method = attached(ll.AdapterSpec(method="ia3", r=1, targets=["layer"]), "linear")
    x = torch.zeros(1, 12)
    torch.testing.assert_close(net(x), net.layer.base_layer.bias[None])


@pytest.mark.parametrize("kind", KINDS)
def test_scale_bias_scales_the_whole_output(kind):
    net, method = attached(ll.AdapterSpec(method="ia3", r=1, targets=["layer"], options={"scale_bias": True}), kind)
    x = net.sample()
    with ll.disabled(net):
        base = net(x)
    torch.testing.assert_close(net(x), base * method.ia3_l)
    bias0 = net.layer.base_layer.bias.detach().clone()
    check_merge_roundtrip(ll.AdapterSpec(method="ia3", r=1, targets=["layer"], options={"scale_bias": True}), [kind])
    ll.merge(net, "a")  # the bias is scaled with the weight
    torch.testing.assert_close(net.layer.base_layer.bias.detach(), bias0 * method.ia3_l.detach())
    ll.unmerge(net)
    torch.testing.assert_close(net.layer.base_layer.bias.detach(), bias0)


# ---- PEFT's IA3 format, both ways ----------------------------------------------------------------
class Pair(nn.Module):
    """Two layers, nn.Linear or GPT-2's Conv1D, with biases: a (12 → 10) and b (10 → 8)."""

    def __init__(self, kind: str = "linear") -> None:
        super().__init__()
        torch.manual_seed(0)
        make = nn.Linear if kind == "linear" else (lambda i, o: Conv1D(o, i))
        self.a, self.b = make(12, 10), make(10, 8)
        with torch.no_grad():
            self.a.bias.normal_(), self.b.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
CASES = [(kind, options) for kind in KINDS for options in ({"scale_bias": True}, {"feedforward": True})]


def randomised(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(1, 0.5)
    return net.eval()


@pytest.mark.parametrize("kind, options", CASES)
def test_peft_loads_loralab_ia3(tmp_path, kind, options):
    from peft import PeftModel

    net = Pair(kind)
    ll.add_adapter(net, ll.AdapterSpec(method="ia3", r=1, targets=["a", "b"], options=options))
    ll.save_adapter(randomised(net), tmp_path)
    theirs = PeftModel.from_pretrained(Pair(kind), tmp_path).eval()
    torch.testing.assert_close(theirs(X), net(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feedforward", [[], ["b"], ["a", "b"], "a"])
def test_loralab_loads_peft_ia3(tmp_path, kind, feedforward):
    """PEFT's feedforward_modules pick, per layer, whether l scales its input or its output (and bias)."""
    from peft import IA3Config, PeftModel, get_peft_model

    config = IA3Config(target_modules=["a", "b"], feedforward_modules=feedforward, fan_in_fan_out=kind != "linear",
                       init_ia3_weights=False)  # random l
    theirs = get_peft_model(Pair(kind), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    net = ll.load_adapter(Pair(kind), tmp_path / "peft").eval()
    torch.testing.assert_close(net(X), theirs(X), atol=1e-5, rtol=1e-5)
    ll.save_adapter(net, tmp_path / "again")  # back to PEFT, module names and all
    again = PeftModel.from_pretrained(Pair(kind), tmp_path / "again").eval()
    torch.testing.assert_close(again(X), theirs(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_equals_peft_merged(tmp_path, kind):
    """PEFT's merge_and_unload scales the bias of an output-scaled layer too: loralab's merged weights and
    biases are PEFT's."""
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["a", "b"], feedforward_modules=["b"], fan_in_fan_out=kind != "linear",
                       init_ia3_weights=False)
    theirs = get_peft_model(Pair(kind), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = ll.merge_and_unload(ll.load_adapter(Pair(kind), tmp_path))
    want = theirs.merge_and_unload().state_dict()
    assert not torch.equal(want["a.bias"], Pair(kind).a.bias)
    for key, t in ours.state_dict().items():
        torch.testing.assert_close(t, want[key], atol=1e-6, rtol=1e-6, msg=key)


def test_file_has_peft_keys_and_fields(tmp_path):
    net = Pair()
    ll.add_adapter(net, ll.AdapterSpec(method="ia3", r=1, targets=["a"], options={"feedforward": True}))
    ll.add_adapter(net, ll.AdapterSpec(method="ia3", r=1, targets=["b"], options={"scale_bias": True}), name="out")
    ll.save_adapter(net, tmp_path / "ff")
    ll.save_adapter(net, tmp_path / "out", name="out")
    assert {k: v.shape for k, v in ll.read_tensors(tmp_path / "ff").items()} == {"a.ia3_l": (1, 12)}
    assert {k: v.shape for k, v in ll.read_tensors(tmp_path / "out").items()} == {"b.ia3_l": (8, 1)}
    config = ll.read_config(tmp_path / "ff")
    assert (config["peft_type"], config["feedforward_modules"], config["init_ia3_weights"]) == ("IA3", ".*", True)
    assert ll.read_config(tmp_path / "out")["feedforward_modules"] == []


def test_unscaled_bias_is_saved_in_loralab_layout(tmp_path):
    """PEFT would scale the bias too: such an adapter is written as LORALAB and reads back the same."""
    net = Pair()
    ll.add_adapter(net, ll.AdapterSpec(method="ia3", r=1, targets=["a"]))
    with torch.no_grad():
        for _, method in methods_of(net, "default"):
            method.ia3_l.normal_(1, 0.3)
    ll.save_adapter(net, tmp_path)
    assert ll.read_config(tmp_path)["peft_type"] == "LORALAB"
    torch.testing.assert_close(ll.load_adapter(Pair(), tmp_path)(X), net(X))


def test_module_names_need_an_adapter_file():
    net = Pair()
    ll.add_adapter(net, ll.AdapterSpec(method="ia3", r=1, targets=["a", "b"], options={"feedforward": ["b"]}))
    with pytest.raises(ValueError, match="learns whether it is one only from an adapter file"):
        net(X)


def test_peft_config_without_feedforward_modules_is_refused():
    config = {"peft_type": "IA3", "target_modules": ["a"], "feedforward_modules": None}
    with pytest.raises(ValueError, match="no feedforward_modules"):
        ll.checkpoint.spec_from_config(config)


@pytest.mark.parametrize("feedforward", [False, True])
def test_loralab_layout_still_loads(tmp_path, feedforward):
    """An (IA)³ file loralab wrote before it used PEFT's format: ia3_l [size], "peft_type": "LORALAB"."""
    net = Net("linear")
    ll.add_adapter(net, ll.AdapterSpec(method="ia3", r=1, targets=["layer"], options={"feedforward": feedforward}))
    (_, method), = methods_of(net, "default")
    randomised(net)
    old = {"base_model.model.layer.ia3_l": method.ia3_l.detach().clone()}
    save_file(old, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("ia3", r=1, alpha=16.0, options={"feedforward": feedforward})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    x = net.sample()
    loaded = ll.load_adapter(Net("linear"), tmp_path)
    torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
