"""LoHa (FedPara, arXiv 2108.06098): ΔW = s·(B₁A₁) ⊙ (B₂A₂); rank can exceed r."""

import json

import pytest
import torch
from method_harness import (
    Net,
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_same_file_as_peft,
    check_save_load,
    check_training_lowers_loss,
)
from old_layout import old_loralab_config
from safetensors.torch import save_file
from torch import nn

import loralab as ll
from loralab.model import methods_of

SPEC = dict(method="loha", r=2, alpha=4, targets=["layer"])


def test_loha(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: 2.0 * (m.hada_B1 @ m.hada_A1) * (m.hada_B2 @ m.hada_A2))
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 2 * 2 * (i + o))
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec)


def test_rank_beyond_r():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    assert torch.linalg.matrix_rank(method.delta_weight().detach()) == 4  # r² with r = 2


def test_dropouts_only_train():
    spec = ll.AdapterSpec(**{**SPEC, "options": {"rank_dropout": 0.5}})
    net, method = attached(spec, "linear")
    x = net.sample()
    with ll.disabled(net):
        base = net(x)
    full = net.eval()(x) - base
    torch.manual_seed(0)
    dropped = net.train()(x) - base
    rows = (dropped.abs() > 0).flatten(0, -2).any(0)
    assert 0 < rows.sum() < 10  # some output rows of ΔW dropped, the rest scaled by 1 / their share
    torch.testing.assert_close(dropped[..., rows], full[..., rows] * 10 / rows.sum())
    net, _ = attached(ll.AdapterSpec(**{**SPEC, "options": {"module_dropout": 0.99}}), "linear")
    with ll.disabled(net):
        base = net(x)
    torch.manual_seed(0)
    torch.testing.assert_close(net.train()(x), base)
    assert not torch.allclose(net.eval()(x), base)


# ---- PEFT's LoHa format, both ways ---------------------------------------------------------------
LAYERS = {"linear": (lambda: (nn.Linear(12, 10), nn.Linear(10, 8)), (3, 5, 12)),
          "conv2d": (lambda: (nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)), (2, 3, 6, 6)),  # b: a 1×1 kernel
          "conv1d": (lambda: (nn.Conv1d(3, 6, 3, padding=1), nn.Conv1d(6, 4, 3)), (2, 3, 8))}


class Pair(nn.Module):
    """Two layers a and b of one kind, with biases."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = LAYERS[kind][0]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def sample(kind: str) -> torch.Tensor:
    return torch.randn(*LAYERS[kind][1], generator=torch.Generator().manual_seed(1))


# (layer kind, spec fields): the settings that change the saved file
CASES = [("linear", {}), ("conv2d", {}), ("conv1d", {}), ("linear", {"rslora": True, "alpha": 6.0}),
         ("linear", {"options": {"rank_dropout": 0.25, "module_dropout": 0.1}, "bias": "lora_only"})]


@pytest.mark.parametrize("kind, extra", CASES)
def test_peft_loads_loralab_loha(tmp_path, kind, extra):
    from peft import PeftModel

    net = Pair(kind)
    ll.add_adapter(net, ll.AdapterSpec(**{"method": "loha", "r": 2, "alpha": 3.0, "targets": ["a", "b"], **extra}))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ll.save_adapter(net.eval(), tmp_path)
    theirs = PeftModel.from_pretrained(Pair(kind), tmp_path).eval()
    x = sample(kind)
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, effective", [("linear", False), ("conv2d", False), ("conv2d", True), ("conv1d", True)])
def test_loralab_loads_peft_loha(tmp_path, kind, effective):
    from peft import LoHaConfig, get_peft_model

    config = LoHaConfig(target_modules=["a", "b"], r=2, alpha=6, rank_dropout=0.2, module_dropout=0.1,
                        use_effective_conv2d=effective, init_weights=False)  # random factors
    theirs = get_peft_model(Pair(kind), config).eval()
    theirs.save_pretrained(tmp_path)
    assert ("a.hada_t1" in ll.read_tensors(tmp_path)) == effective  # PEFT's CP form, on a's 3-wide kernel
    net = ll.load_adapter(Pair(kind), tmp_path).eval()
    x = sample(kind)
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert ll.get_spec(net, "default").options == {"rank_dropout": 0.2, "module_dropout": 0.1}


def test_file_has_peft_keys_and_fields(tmp_path):
    from peft import LoHaConfig, get_peft_model

    theirs = get_peft_model(Pair("conv2d"), LoHaConfig(target_modules=["a", "b"], r=2, alpha=3, rank_dropout=0.25,
                                                       module_dropout=0.1))
    net = Pair("conv2d")
    ll.add_adapter(net, ll.AdapterSpec(method="loha", r=2, alpha=3, targets=["a", "b"],
                                       options={"rank_dropout": 0.25, "module_dropout": 0.1}))
    check_same_file_as_peft(tmp_path, theirs, net, ("peft_type", "r", "alpha", "rank_dropout", "module_dropout",
                                                    "use_effective_conv2d", "rank_pattern", "alpha_pattern"),
                            exact=False)  # random factors


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_per_layer_ranks_both_ways(tmp_path, kind):
    """PEFT's rank_pattern and alpha_pattern: a PEFT LoHa with them loads in loralab with those ranks and the
    same outputs, and saved again PEFT reads it the same."""
    from peft import LoHaConfig, PeftModel, get_peft_model

    config = LoHaConfig(target_modules=["a", "b"], r=2, alpha=4, rank_pattern={"b": 3}, alpha_pattern={"a": 1.5},
                        init_weights=False)
    theirs = get_peft_model(Pair(kind), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    net = ll.load_adapter(Pair(kind), tmp_path / "peft").eval()
    x = sample(kind)
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    methods = dict(methods_of(net, "default"))
    assert (methods["a"].r, methods["a"].scale, methods["b"].r, methods["b"].scale) == (2, 0.75, 3, 4 / 3)
    ll.save_adapter(net, tmp_path / "ours")
    saved = ll.read_config(tmp_path / "ours")
    assert (saved["rank_pattern"], saved["alpha_pattern"]) == ({"b": 3}, {"a": 1.5})
    again = PeftModel.from_pretrained(Pair(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(again(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_loralab_layout_still_loads(tmp_path):
    """A LoHa file loralab wrote before it used PEFT's format: its own keys, "peft_type": "LORALAB"."""
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    old = {f"base_model.model.layer.{k}": v.detach().clone() for k, v in method.named_parameters()}
    save_file(old, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("loha", r=2, alpha=4)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    x = net.sample()
    loaded = ll.load_adapter(Net("linear"), tmp_path)
    torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
