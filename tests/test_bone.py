"""Bone (arXiv 2409.15371): ΔW_ij = W_ij·B_j + B_j on r×r blocks, B shared down each column of blocks
(or along each row: option share="rows", PEFT's MiSS Bat)."""

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
from safetensors.torch import load_file, save_file

import loralab as ll
from loralab.checkpoint import adapter_config
from loralab.methods.bone import Bone
from loralab.model import methods_of

SPEC = dict(method="bone", r=2, alpha=2, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def reference(m, w):
    delta = torch.zeros_like(w)
    for i in range(w.shape[0] // 2):
        for j in range(w.shape[1] // 2):
            block = w[2 * i:2 * i + 2, 2 * j:2 * j + 2]
            b = m.bone_B[j] if m.options["share"] == "columns" else m.bone_B[i]
            delta[2 * i:2 * i + 2, 2 * j:2 * j + 2] = block @ b + b
    return delta


@pytest.mark.parametrize("share, count", [("columns", 12 * 2), ("rows", 10 * 2)])  # in 12, out 10
def test_bone(tmp_path, share, count):
    spec = ll.AdapterSpec(**{**SPEC, "options": {"share": share}})
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: count, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


def test_r_must_divide_the_layer():
    with pytest.raises(ValueError, match="divide"):
        attached(ll.AdapterSpec(**{**SPEC, "r": 5}), "linear")  # in = 12


def test_share_must_be_columns_or_rows():
    with pytest.raises(ValueError, match="share must be 'columns'.*or 'rows'"):
        attached(ll.AdapterSpec(**{**SPEC, "options": {"share": "both"}}), "linear")


# ---- PEFT's MiSS format (share="rows") -----------------------------------------------------
ROWS = {**SPEC, "options": {"share": "rows"}}


def peft_bat(**fields):
    """PEFT's MiSS Bat on Net("linear") with a random miss_block (PEFT starts it at zero)."""
    from peft import MissConfig, get_peft_model

    theirs = get_peft_model(Net("linear"), MissConfig(target_modules=["layer"], r=2, init_weights="bat", **fields))
    with torch.no_grad():
        theirs.base_model.model.layer.miss_block["default"].normal_(0, 0.3)
    return theirs.eval()


@pytest.mark.parametrize("extra", [{}, {"bias": "lora_only", "dropout": 0.1}])
def test_peft_loads_loralab_bone(tmp_path, extra):
    from peft import PeftModel

    net, _ = attached(ll.AdapterSpec(**{**ROWS, **extra}), "linear")  # B randomised
    if extra:
        with torch.no_grad():
            net.layer.base_layer.bias.normal_()  # a trained bias, saved with the adapter
    ll.save_adapter(net, tmp_path, name="a")
    x = net.sample()
    theirs = PeftModel.from_pretrained(Net("linear"), tmp_path, is_trainable=True).eval()
    torch.testing.assert_close(theirs(x), net.eval()(x), atol=1e-5, rtol=1e-5)
    assert theirs.base_model.model.layer.base_layer.bias.requires_grad == bool(extra)  # PEFT trains it too


@pytest.mark.parametrize("fields", [{}, {"bias": "MiSS_only", "miss_dropout": 0.1}])
def test_loralab_loads_peft_bone(tmp_path, fields):
    theirs = peft_bat(**fields)
    if fields:
        with torch.no_grad():
            theirs.base_model.model.layer.base_layer.bias.normal_()
    theirs.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) >= {"base_model.model.layer.miss_block"}
    net = ll.load_adapter(Net("linear"), tmp_path).eval()
    x = Net("linear").sample()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_saved_layout_is_peft_s(tmp_path):
    peft_bat().save_pretrained(tmp_path / "peft")
    net, _ = attached(ll.AdapterSpec(**ROWS), "linear")
    ll.save_adapter(net, tmp_path / "ours", name="a")
    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_weights"], config["r"]) == ("MISS", "bat", 2)


@pytest.mark.parametrize("init_weights, options", [
    (True, {"variant": "balance"}), (False, {"variant": "balance"}), ("mini", {"variant": "mini", "mini_r": 2}),
])
def test_peft_variants_that_are_not_a_bone_load_as_miss(tmp_path, init_weights, options):
    """Bone reads every MiSS file; balance and mini, whose update tiles one shard whatever W is, are loralab's miss
    (their outputs against PEFT's: tests/test_miss.py)."""
    from peft import MissConfig, get_peft_model

    config = MissConfig(target_modules=["layer"], r=2, init_weights=init_weights, mini_r=2)
    get_peft_model(Net("linear"), config).save_pretrained(tmp_path)
    spec = ll.get_spec(ll.load_adapter(Net("linear"), tmp_path), "default")
    assert (spec.method, spec.options) == ("miss", options)


# ---- share="columns": loralab's own layout, as before --------------------------------------
def test_columns_are_saved_in_loralab_s_layout_as_before(tmp_path, monkeypatch):
    net, _ = attached(ll.AdapterSpec(**{**SPEC, "dropout": 0.1, "options": {"share": "columns"}}), "linear")
    ll.save_adapter(net, tmp_path, name="a")
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {"base_model.model.layer.bone_B"}
    monkeypatch.setattr(Bone, "peft_type", None)  # what checkpoint.py writes for a method PEFT lacks
    old = json.loads(json.dumps(adapter_config(net, "a")))
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == old


def test_old_loralab_layout_still_loads(tmp_path):
    """The layout loralab wrote before it used PEFT's MiSS format: `bone_B` under peft_type LORALAB."""
    b = torch.randn(6, 2, 2)
    save_file({"base_model.model.layer.bone_B": b}, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("bone", r=2, alpha=2)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    net = ll.load_adapter(Net("linear"), tmp_path)
    (_, method), = methods_of(net, "default")
    assert method.options["share"] == "columns"
    torch.testing.assert_close(method.bone_B.detach(), b)
