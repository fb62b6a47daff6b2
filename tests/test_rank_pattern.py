"""Per-layer ranks in PEFT's rank_pattern: the keys loralab writes give every layer its own value under
PEFT's matching rule (peft.utils.other.get_pattern_key), even where one module name ends another; an
AdapterSpec's own rank_pattern / alpha_pattern build each layer with its r and alpha."""

import pytest
import torch
from method_harness import Stack, randomise_trainables
from peft.utils.other import get_pattern_key

import loralab as ll
from loralab.model import methods_of
from loralab.rank_pattern import pattern_value, write_pattern

CASES = [
    ({"a": 2, "b": 2}, 2),  # nothing differs: empty pattern
    ({"layer": 2, "block.layer": 4, "x.block.layer": 4}, 4),  # "layer" alone would catch the others
    ({"layer": 4, "block.layer": 2, "x.block.layer": 8}, 4),
    ({"q": 1.5, "attn.q": 2.0}, 2.0),
]


@pytest.mark.parametrize("values, default", CASES)
def test_written_pattern_resolves_each_layer_as_peft_does(values, default):
    pattern = write_pattern(values, default)
    for path, value in values.items():
        assert pattern_value(pattern, path, default) == value
        key = get_pattern_key(pattern.keys(), path)  # PEFT's own lookup
        assert pattern.get(key, default) == value
    assert (pattern == {}) == all(v == default for v in values.values())


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_spec_patterns_build_each_layer_and_peft_reads_them(tmp_path, method):
    from peft import PeftModel

    net = Stack()
    spec = ll.AdapterSpec(method=method, r=2, alpha=4, targets=["a", "b", "c"], rank_pattern={"c": 5},
                          alpha_pattern={"b": 1.0})
    ll.add_adapter(net, spec)
    assert [(m.r, m.scale) for _, m in methods_of(net, "default")] == [(2, 2.0), (2, 0.5), (5, 0.8)]
    assert tuple(net.c.adapters["default"].lora_A.shape) == (5, 12)
    randomise_trainables(net)
    ll.save_adapter(net.eval(), tmp_path)
    config = ll.read_config(tmp_path)
    assert (config["rank_pattern"], config["alpha_pattern"]) == ({"c": 5}, {"b": 1.0})
    theirs = PeftModel.from_pretrained(Stack(), tmp_path).eval()
    torch.testing.assert_close(theirs(X), net(X), atol=1e-5, rtol=1e-5)
    again = ll.load_adapter(Stack(), tmp_path).eval()
    torch.testing.assert_close(again(X), net(X), atol=1e-6, rtol=1e-6)


def test_rank_pattern_refused_where_layers_share_parameters_sized_by_r():
    with pytest.raises(ValueError, match="'vera' shares parameters across layers sized by one r"):
        ll.add_adapter(Stack(), ll.AdapterSpec(method="vera", r=2, targets=["a", "b", "c"], rank_pattern={"c": 4}))
    net = ll.add_adapter(Stack(), ll.AdapterSpec(method="vera", r=2, targets=["a", "b", "c"], alpha_pattern={"c": 8}))
    assert net.c.adapters["default"].scale == 4.0


@pytest.mark.parametrize("field, value, message", [
    ("rank_pattern", {"a": 0}, r"rank_pattern\['a'\] must be a positive integer, got 0"),
    ("rank_pattern", {"a": 2.5}, "must be a positive integer"),
    ("alpha_pattern", {"a": -1.0}, r"alpha_pattern\['a'\] must be a positive number"),
    ("rank_pattern", {"a(": 2}, "not a valid regular expression"),
])
def test_bad_patterns_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ll.AdapterSpec(targets=["a"], **{field: value})


def test_pattern_naming_no_adapted_module_warns_with_close_matches():
    with pytest.warns(UserWarning, match="rank_pattern key 'cc' matches none of the adapted modules"):
        ll.add_adapter(Stack(), ll.AdapterSpec(r=2, targets=["a", "b", "c"], rank_pattern={"cc": 4}))


@pytest.mark.parametrize("method, patterns", [
    ("vera", {"alpha_pattern": {"c": 8.0}}),  # PEFT's VeRA has one scale
    ("adalora", {"rank_pattern": {"b": 3}}),  # PEFT's AdaLoRA: one init_r (its rank_pattern holds masks)
    ("oft", {"rank_pattern": {"c": 4}}),
    ("sora", {"rank_pattern": {"a": 3}, "alpha_pattern": {"b": 1.0}}),  # no PEFT format at all
])
def test_patterns_a_peft_format_cannot_hold_are_saved_in_loralab_layout(tmp_path, method, patterns):
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(method=method, r=2, alpha=4, targets=["a", "b", "c"], **patterns))
    randomise_trainables(net)
    ll.save_adapter(net.eval(), tmp_path)
    assert ll.read_config(tmp_path)["peft_type"] == "LORALAB"
    again = ll.load_adapter(Stack(), tmp_path).eval()
    assert [(m.r, m.scale) for _, m in methods_of(again, "default")] == [
        (m.r, m.scale) for _, m in methods_of(net, "default")]
    torch.testing.assert_close(again(X), net(X), atol=1e-6, rtol=1e-6)
