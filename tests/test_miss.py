"""MiSS (arXiv 2409.15371), PEFT's balance and mini variants: ΔW[o, i] = M[i mod r, o] with M [r, out], or
M [r, mini_r] tiled along out, ΔW[o, i] = M[i mod r, o mod mini_r]; x zero-padded where r does not divide in."""

import dataclasses
import json
import warnings

import pytest
import torch
from method_harness import (
    Net,
    attached,
    base_matrix,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
    dense_forward,
)
from safetensors.torch import load_file

import loralab as ll
from loralab.checkpoint import _peft_formats, spec_from_config
from loralab.methods.base import METHODS
from loralab.methods.bone import Bone
from loralab.model import methods_of

KINDS = ("linear", "hf-conv1d")  # Net's layers: in 12, out 10
BASE = dict(method="miss", alpha=2, targets=["layer"])
BALANCE = {"variant": "balance"}


def mini(mini_r):
    return {"variant": "mini", "mini_r": mini_r}


def reference(m, w):
    """ΔW entry by entry, from the equation (not from the method's code)."""
    out_f, in_f = w.shape
    shard = m.miss_block.detach()
    is_mini = m.options["variant"] == "mini"
    delta = torch.empty_like(w)
    for o in range(out_f):
        for i in range(in_f):
            delta[o, i] = shard[i % m.r, o % m.options["mini_r"] if is_mini else o]
    return delta


# (r, options, trainable count on Net's 12 → 10 layer); r=5 does not divide in=12: x padded to 15
CASES = [(2, BALANCE, 2 * 10), (5, BALANCE, 5 * 10), (2, mini(5), 2 * 5), (5, mini(2), 5 * 2), (3, mini(10), 3 * 10),
         (4, mini(1), 4 * 1)]


@pytest.mark.parametrize("r, options, count", CASES)
def test_miss(tmp_path, r, options, count):
    spec = ll.AdapterSpec(**BASE, r=r, options=options)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: count, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


@pytest.mark.parametrize("r, options, count", CASES)
def test_delta_is_the_change_to_the_output(r, options, count):
    """The method's own unmerged paths (delta, forward, add_to), besides the layer's, against the reference."""
    net, method = attached(ll.AdapterSpec(**BASE, r=r, options=options), "linear")
    x = net.sample()
    want = x @ reference(method, base_matrix(net)).T
    torch.testing.assert_close(method.delta(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method(x, None), want, atol=1e-5, rtol=1e-5)
    out = torch.randn(*x.shape[:-1], 10)
    torch.testing.assert_close(method.add_to(out, x, None), out + want, atol=1e-5, rtol=1e-5)


def test_reference_by_hand():
    """The reference itself on a tiny case, written out: in 5, r 2 (x padded to 6), out 4, mini_r 2."""
    class M:
        r, options = 2, mini(2)
        miss_block = torch.tensor([[1.0, 2.0], [3.0, 4.0]])

    want = torch.tensor([[1.0, 3.0, 1.0, 3.0, 1.0],
                         [2.0, 4.0, 2.0, 4.0, 2.0],
                         [1.0, 3.0, 1.0, 3.0, 1.0],
                         [2.0, 4.0, 2.0, 4.0, 2.0]])
    torch.testing.assert_close(reference(M, torch.zeros(4, 5)), want)


@pytest.mark.parametrize("r, options", [(2, BALANCE), (5, mini(5))])
def test_starts_at_zero(r, options):
    net, method = attached(ll.AdapterSpec(**BASE, r=r, options=options), "linear", randomize=False)
    x = net.sample()
    torch.testing.assert_close(net(x), dense_forward(net, x, base_matrix(net)), atol=0, rtol=0)
    assert not method.miss_block.any()


def test_dropout_acts_on_the_input_in_training():
    """As PEFT: y = W x + b + ΔW·dropout(x) (the base path sees x itself)."""
    net, method = attached(ll.AdapterSpec(**BASE, r=5, dropout=0.5, options=BALANCE), "linear")
    net.train()
    x = net.sample()
    w = base_matrix(net)
    torch.manual_seed(3)
    got = net(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    want = dense_forward(net, x, w) + dropped @ reference(method, w).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, net.eval()(x))


def test_unmerged_forward_matches_merged_with_dropout_off_in_eval():
    net, _ = attached(ll.AdapterSpec(**BASE, r=5, dropout=0.5, options=mini(2)), "linear")
    net.eval()
    x = net.sample()
    unmerged = net(x)
    ll.merge(net, "a")
    torch.testing.assert_close(net(x), unmerged, atol=1e-5, rtol=1e-5)


# ---- options refused --------------------------------------------------------------------
@pytest.mark.parametrize("r, options, message", [
    (2, {"variant": "bat"}, r"miss option variant must be 'balance' .* or 'mini' .*, got 'bat'"),
    (2, {"variant": "mini"}, r"miss variant 'mini' needs option mini_r, a positive integer .* got mini_r=None"),
    (2, mini(0), r"needs option mini_r, a positive integer .* got mini_r=0"),
    (2, mini(True), r"needs option mini_r, a positive integer .* got mini_r=True"),
    (2, mini(2.0), r"needs option mini_r, a positive integer .* got mini_r=2.0"),
    (2, mini(3), r"miss variant 'mini' needs mini_r to divide out=10 \(as PEFT requires\), got mini_r=3"),
    (2, {"variant": "balance", "mini_r": 2}, r"miss option mini_r is for variant='mini'"),
    (2, {"share": "rows"}, r"method 'miss' does not take option\(s\) \['share'\]; it takes: mini_r, variant"),
    (13, BALANCE, r"r=13 is larger than 'miss' allows .* \(at most 12\)"),  # PEFT: r <= in_features
])
def test_bad_options_are_refused(r, options, message):
    with pytest.raises(ValueError, match=message):
        attached(ll.AdapterSpec(**BASE, r=r, options=options), "linear")


def test_only_linear_layers():
    with pytest.raises(ValueError, match="does not support Conv2d layers; it supports: linear, hf-conv1d"):
        attached(ll.AdapterSpec(**BASE, r=2), "conv")


# ---- PEFT's MiSS format, both ways ---------------------------------------------------------
def saved_config(path):
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("r, options, init_weights, mini_r", [
    (2, BALANCE, True, 1), (5, BALANCE, True, 1), (2, mini(5), "mini", 5), (5, mini(2), "mini", 2),
])
@pytest.mark.parametrize("extra", [{}, {"bias": "lora_only", "dropout": 0.1}])
def test_peft_loads_loralab_miss(tmp_path, r, options, init_weights, mini_r, extra):
    from peft import PeftModel

    net, method = attached(ll.AdapterSpec(**BASE, r=r, options=options, **extra), "linear")  # M randomised
    if extra:
        with torch.no_grad():
            net.layer.base_layer.bias.normal_()  # a trained bias, saved with the adapter
    ll.save_adapter(net, tmp_path, name="a")
    config = saved_config(tmp_path)
    assert (config["peft_type"], config["r"], config["init_weights"], config["mini_r"]) == ("MISS", r, init_weights,
                                                                                           mini_r)
    assert config["miss_dropout"] == extra.get("dropout", 0.0)
    assert config["bias"] == ("MiSS_only" if extra else "none")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.layer.miss_block"].shape == method.miss_block.shape
    x = net.sample()
    theirs = PeftModel.from_pretrained(Net("linear"), tmp_path, is_trainable=True).eval()
    ours = net.eval()(x)
    torch.testing.assert_close(theirs(x), ours, atol=1e-5, rtol=1e-5)
    assert theirs.base_model.model.layer.base_layer.bias.requires_grad == bool(extra)  # PEFT trains it too
    torch.testing.assert_close(theirs.merge_and_unload()(x), ours, atol=1e-5, rtol=1e-5)  # PEFT's merge too


def peft_miss(r, **fields):
    """PEFT's MiSS on Net("linear") with a random miss_block (PEFT starts it at zero)."""
    from peft import MissConfig, get_peft_model

    theirs = get_peft_model(Net("linear"), MissConfig(target_modules=["layer"], r=r, **fields))
    with torch.no_grad():
        theirs.base_model.model.layer.miss_block["default"].normal_(0, 0.3)
    return theirs.eval()


@pytest.mark.parametrize("r, fields, options", [
    (2, {}, BALANCE),  # PEFT's default: init_weights=True
    (2, {"init_weights": True}, BALANCE),
    (5, {"init_weights": False}, BALANCE),  # a random start, the same update
    (2, {"init_weights": "mini", "mini_r": 5}, mini(5)),
    (5, {"init_weights": "mini", "mini_r": 2}, mini(2)),
    (3, {"init_weights": "mini"}, mini(1)),  # PEFT's default mini_r
    (2, {"init_weights": True, "bias": "MiSS_only", "miss_dropout": 0.1}, BALANCE),
])
def test_loralab_loads_peft_miss(tmp_path, r, fields, options):
    theirs = peft_miss(r, **fields)
    if "bias" in fields:
        with torch.no_grad():
            theirs.base_model.model.layer.base_layer.bias.normal_()
    theirs.save_pretrained(tmp_path)
    net = ll.load_adapter(Net("linear"), tmp_path).eval()
    spec = ll.get_spec(net, "default")
    assert (spec.method, spec.r, spec.options) == ("miss", r, options)
    assert spec.dropout == fields.get("miss_dropout", 0.0)
    assert spec.bias == ("lora_only" if "bias" in fields else "none")
    (_, method), = methods_of(net, "default")
    assert type(method) is METHODS.get("miss")
    x = Net("linear").sample()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_saved_layout_is_peft_s(tmp_path):
    for name, options, fields in [("balance", BALANCE, {}), ("mini", mini(5), {"init_weights": "mini", "mini_r": 5})]:
        peft_miss(2, **fields).save_pretrained(tmp_path / name / "peft")
        net, _ = attached(ll.AdapterSpec(**BASE, r=2, options=options), "linear")
        ll.save_adapter(net, tmp_path / name / "ours", name="a")
        theirs, mine = (load_file(str(tmp_path / name / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}, name
        ours, peft = saved_config(tmp_path / name / "ours"), saved_config(tmp_path / name / "peft")
        for field in ("peft_type", "r", "init_weights", "mini_r", "miss_dropout", "bias"):
            assert ours[field] == peft[field], (name, field)


def test_config_holds_only_fields_peft_knows(tmp_path):
    """As tests/test_checkpoint_peft.py checks for every method in a PEFT format: no field PEFT's MissConfig
    lacks (fan_in_fan_out left out on nn.Linear layers), and PEFT reads it without warning."""
    from method_harness import Stack
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for options in (BALANCE, mini(4)):  # Stack's outs: 12, 12, 20
        net = Stack()
        ll.add_adapter(net, ll.AdapterSpec(method="miss", r=4, options=options, targets=["a", "b", "c"]))
        ll.save_adapter(net, tmp_path)
        config = ll.read_config(tmp_path)
        known = {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]])}
        assert sorted(set(config) - known) == []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PeftConfig.from_pretrained(tmp_path)
        assert not any("Unexpected keyword arguments" in str(w.message) for w in caught)


def test_conv1d_miss_is_saved_and_read_by_loralab(tmp_path):
    """PEFT's MiSS takes nn.Linear only; on GPT-2's Conv1D the same format is read back by loralab."""
    net, _ = attached(ll.AdapterSpec(**BASE, r=5, options=mini(2)), "hf-conv1d")
    ll.save_adapter(net, tmp_path, name="a")
    assert saved_config(tmp_path)["fan_in_fan_out"] is True
    fresh = ll.load_adapter(Net("hf-conv1d"), tmp_path)
    x = net.sample()
    torch.testing.assert_close(fresh(x), net(x), atol=0, rtol=0)


# ---- one reader for peft_type MISS ---------------------------------------------------------
def test_bone_reads_every_miss_file():
    """MiSS and Bone both save as MISS; Bone is the one reader, whatever order the registry gives."""
    assert _peft_formats()["MISS"] is Bone
    readers = {}
    for name, cls in METHODS.items():
        if cls.peft_type not in (None, "LORA") and cls.peft_reader:
            assert cls.peft_type not in readers, f"{name} and {readers[cls.peft_type]} both read {cls.peft_type}"
            readers[cls.peft_type] = name


@pytest.mark.parametrize("init_weights, want", [
    (True, ("miss", {"variant": "balance"})), (False, ("miss", {"variant": "balance"})),
    ("mini", ("miss", {"variant": "mini", "mini_r": 8})), ("bat", ("bone", {"share": "rows"})),
])
def test_spec_from_a_miss_config(init_weights, want):
    config = {"peft_type": "MISS", "r": 4, "init_weights": init_weights, "mini_r": 8, "miss_dropout": 0.05,
              "bias": "MiSS_only", "target_modules": ["q"]}
    spec = spec_from_config(config)
    assert (spec.method, spec.options) == want
    assert (spec.r, spec.dropout, spec.bias) == (4, 0.05, "lora_only")


def test_unknown_init_weights_is_refused():
    with pytest.raises(ValueError, match=r"init_weights='pissa'; PEFT's MiSS variants are true or false"):
        spec_from_config({"peft_type": "MISS", "r": 4, "init_weights": "pissa", "target_modules": ["q"]})
