"""LoKr / KronA (arXiv 2212.10650): ΔW = s·W₁ ⊗ W₂; the unmerged path uses the Kronecker identity."""

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
from loralab.methods.base import SavedTensors
from loralab.methods.lokr import split
from loralab.model import methods_of

SPEC = dict(method="lokr", r=1, alpha=2, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def kron(c, d):
    """Written out block by block, independently of torch.kron."""
    rows = [torch.cat([c[i, j] * d for j in range(c.shape[1])], dim=1) for i in range(c.shape[0])]
    return torch.cat(rows, dim=0)


def kron_delta(m):
    """s · W₁ ⊗ W₂ from whichever factors the layer holds."""
    w1 = m.lokr_w1 if hasattr(m, "lokr_w1") else m.lokr_w1_a @ m.lokr_w1_b
    w2 = m.lokr_w2 if hasattr(m, "lokr_w2") else m.lokr_w2_a @ m.lokr_w2_b
    return m.scale * kron(w1, w2)


@pytest.mark.parametrize("r, options, count", [
    (1, {}, 2 * 3 + 1 * (5 + 4)),  # out 10 = 2·5, in 12 = 3·4
    (3, {}, 2 * 3 + 5 * 4),  # r ≥ max(5, 4)/2: W₂ in full
    (1, {"decompose_both": True}, 1 * (2 + 3) + 1 * (5 + 4)),  # r < max(2, 3)/2: W₁ = W1_a W1_b
])
def test_lokr(tmp_path, r, options, count):
    spec = ll.AdapterSpec(**{**SPEC, "r": r, "options": options})
    check_forward(spec, lambda m, w: kron_delta(m), kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: count, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


def test_factor_shapes():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    assert (method.o1, method.o2, method.i1, method.i2) == (2, 5, 3, 4)
    assert split(128, None) == (8, 16) and split(127, None) == (1, 127)  # PEFT's factorization examples
    assert split(128, 4) == (4, 32) and split(12, 6) == (6, 2) and split(10, 4) == (2, 5)


@pytest.mark.parametrize("options, message", [
    ({"factor": 0}, "factor must be None or a positive integer"),
    ({"decompose_both": 1}, "decompose_both must be True or False"),
])
def test_invalid_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attached(ll.AdapterSpec(**{**SPEC, "options": options}), "linear")


# ---- PEFT's LoKr format --------------------------------------------------------------------
# (loralab spec fields, the same adapter as PEFT's LoKrConfig fields), each a different saved layout
SETTINGS = [
    (dict(r=1, alpha=2), dict(r=1, alpha=2)),  # lokr_w1, lokr_w2_a, lokr_w2_b
    (dict(r=3, alpha=2), dict(r=3, alpha=2)),  # lokr_w1, lokr_w2
    (dict(r=1, alpha=2, options={"decompose_both": True}), dict(r=1, alpha=2, decompose_both=True)),  # lokr_w1_a/b
    (dict(r=1, alpha=2, options={"factor": 4}), dict(r=1, alpha=2, decompose_factor=4)),  # W₁ [2, 4], W₂ [5, 3]
]


def peft_file(tmp_path, **fields) -> None:
    from peft import LoKrConfig, get_peft_model

    config = LoKrConfig(target_modules=["layer"], init_weights=False, **fields)  # random factors, W₁ included
    get_peft_model(Net("linear"), config).save_pretrained(tmp_path)


@pytest.mark.parametrize("ours", [s for s, _ in SETTINGS] + [dict(r=2, alpha=3, rslora=True), dict(bias="all")])
def test_peft_loads_loralab_lokr(tmp_path, ours):
    from peft import PeftModel

    net, _ = attached(ll.AdapterSpec(**{**SPEC, **ours}), "linear")  # every factor randomised
    if "bias" in ours:
        with torch.no_grad():
            net.layer.base_layer.bias.normal_()  # a trained bias: PEFT's LoKr loads it (and would not train it)
    ll.save_adapter(net, tmp_path, name="a")
    x = net.sample()
    theirs = PeftModel.from_pretrained(Net("linear"), tmp_path).eval()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ours, peft_fields", SETTINGS)
def test_saved_layout_is_peft_s(tmp_path, ours, peft_fields):
    peft_file(tmp_path / "peft", **peft_fields)
    net, _ = attached(ll.AdapterSpec(**{**SPEC, **ours}), "linear")
    ll.save_adapter(net, tmp_path / "ours", name="a")
    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("ours, peft_fields", SETTINGS)
def test_loralab_loads_peft_lokr(tmp_path, ours, peft_fields):
    from peft import PeftModel

    peft_file(tmp_path, **peft_fields)
    theirs = PeftModel.from_pretrained(Net("linear"), tmp_path).eval()
    net = ll.load_adapter(Net("linear"), tmp_path)
    x = Net("linear").sample()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit, message", [
    ({"decompose_factor": 0}, "decompose_factor=0; loralab reads -1"),
])
def test_peft_files_loralab_cannot_read_are_refused(tmp_path, edit, message):
    peft_file(tmp_path, r=1, alpha=2)
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))
    with pytest.raises(ValueError, match=message):
        ll.load_adapter(Net("linear"), tmp_path)


def test_per_layer_ranks_both_ways(tmp_path):
    """PEFT's rank_pattern and alpha_pattern: a layer of its own rank changes its factorisation too."""
    from method_harness import Stack
    from peft import LoKrConfig, PeftModel, get_peft_model

    config = LoKrConfig(target_modules=["a", "b", "c"], r=1, alpha=2, rank_pattern={"c": 3}, alpha_pattern={"b": 5},
                        decompose_both=True, init_weights=False)
    theirs = get_peft_model(Stack(), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    net = ll.load_adapter(Stack(), tmp_path / "peft").eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert [(m.r, m.scale) for _, m in methods_of(net, "default")] == [(1, 2.0), (1, 5.0), (3, 2 / 3)]
    ll.save_adapter(net, tmp_path / "ours")
    again = PeftModel.from_pretrained(Stack(), tmp_path / "ours").eval()
    torch.testing.assert_close(again(x), theirs(x), atol=1e-5, rtol=1e-5)


# ---- loralab's old layout ------------------------------------------------------------------
# r, factor, the old shapes of C, B and A: factor 6 split in = 12 as 3·4 then, as 6·2 now (PEFT's rule)
OLD = [(1, 6, (2, 3), (5, 1), (1, 4)), (3, None, (2, 3), (5, 3), (3, 4))]  # r = 3: W₂ = B A is now kept in full


@pytest.mark.parametrize("r, factor, c_shape, b_shape, a_shape", OLD)
def test_old_layout_keys_are_read(r, factor, c_shape, b_shape, a_shape):
    """What load_adapter hands a LoKr layer from loralab's old layout: `lokr_C`, `lokr_B`, `lokr_A`."""
    net, method = attached(ll.AdapterSpec(**{**SPEC, "r": r, "options": {"factor": factor}}), "linear")
    old = {"lokr_C": torch.randn(c_shape), "lokr_B": torch.randn(b_shape), "lokr_A": torch.randn(a_shape)}
    method.requires_grad_(False)  # as an adapter loaded inactive: the remade factors stay frozen
    saved = SavedTensors(old)
    method.from_saved(saved, where="layer")
    assert saved.read == {"lokr_C", "lokr_B", "lokr_A"}  # so none is reported as unexpected
    x = net.sample()
    expected = net.layer.base_layer(x) + x @ (2.0 / r * kron(old["lokr_C"], old["lokr_B"] @ old["lokr_A"])).T
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in method.parameters())


def test_old_layout_of_another_shape_is_refused():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    old = {"lokr_C": torch.randn(2, 3), "lokr_B": torch.randn(5, 2), "lokr_A": torch.randn(2, 4)}
    with pytest.raises(ValueError, match="not the factors of a rank-1 LoKr on a layer of shape"):
        method.from_saved(old, where="layer")


def test_old_loralab_layout_still_loads(tmp_path):
    """The layout loralab wrote before it used PEFT's: lokr_C, lokr_B, lokr_A under peft_type LORALAB."""
    r, factor, c_shape, b_shape, a_shape = OLD[0]
    old = {"lokr_C": torch.randn(c_shape), "lokr_B": torch.randn(b_shape), "lokr_A": torch.randn(a_shape)}
    save_file({f"base_model.model.layer.{k}": v for k, v in old.items()}, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("lokr", r=r, alpha=2, options={"factor": factor})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    net = ll.load_adapter(Net("linear"), tmp_path)
    (_, method), = methods_of(net, "default")
    torch.testing.assert_close(method.delta_weight(), 2.0 / r * kron(old["lokr_C"], old["lokr_B"] @ old["lokr_A"]))
