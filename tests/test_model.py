"""Attaching adapters to plain nn.Modules: targets, activation, mixing, merging, removal, errors."""

import pytest
import torch
from torch import nn

import loralab as ll
from loralab.layers import AdaptedLayer, SavedModule


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(16, 16), "v_proj": nn.Linear(16, 16),
                                                   "norm": nn.LayerNorm(16)}) for _ in range(2))
        self.classifier = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = b["norm"](h + b["q_proj"](h).tanh() + b["v_proj"](h))
        return self.classifier(h.mean(1))

    def get_output_embeddings(self) -> nn.Module:
        return self.classifier


def ids(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 30, (n, 7), generator=torch.Generator().manual_seed(1))


def perturb(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".{name}." in pname and ("lora_B" in pname or "copies" in pname):
                p.add_(torch.randn(p.shape, generator=g))


def test_suffix_targets_pick_matching_layers():
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj"]))
    adapted = sorted(n for n, mod in m.named_modules() if isinstance(mod, AdaptedLayer))
    assert adapted == ["blocks.0.q_proj", "blocks.1.q_proj"]


def test_regex_targets_use_fullmatch():
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=r"blocks\.1\..*_proj"))
    adapted = sorted(n for n, mod in m.named_modules() if isinstance(mod, AdaptedLayer))
    assert adapted == ["blocks.1.q_proj", "blocks.1.v_proj"]


def test_all_linear_skips_output_head():
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets="all-linear"))
    adapted = {n for n, mod in m.named_modules() if isinstance(mod, AdaptedLayer)}
    assert adapted == {f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def adapted_paths(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def test_layers_pick_numbered_blocks_as_peft_layers_to_transform_does():
    model = ll.add_adapter(Tiny(), ll.AdapterSpec(targets=["q_proj", "v_proj"], layers=[1]))
    assert adapted_paths(model) == {"blocks.1.q_proj", "blocks.1.v_proj"}
    model = ll.add_adapter(Tiny(), ll.AdapterSpec(targets="all-linear", layers=0, layers_pattern="blocks"))
    assert adapted_paths(model) == {"blocks.0.q_proj", "blocks.0.v_proj"}  # the head sits in no block
    model = ll.add_adapter(Tiny(), ll.AdapterSpec(targets=["v_proj", "blocks.1.q_proj"], layers=[0]))
    assert adapted_paths(model) == {"blocks.0.v_proj", "blocks.1.q_proj"}  # named in full: kept


@pytest.mark.parametrize("spec, message", [
    (dict(targets=["q_proj"], layers=[0, 5]), r"layers \[5\] hold no targeted module \(blocks found: \[0, 1\]\)"),
    (dict(targets=["q_proj"], layers=[0], layers_pattern="layers"), r"layers \[0\] hold no targeted module"),
])
def test_layers_that_hold_no_target_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        ll.add_adapter(Tiny(), ll.AdapterSpec(**spec))


@pytest.mark.parametrize("spec, message", [
    (dict(targets=r".*q_proj", layers=[0]), "put the block indices into the regex"),
    (dict(layers_pattern="blocks"), "layers is not set"),
    (dict(layers=[-1]), "integers >= 0"),
    (dict(layers=[]), "non-empty list"),
])
def test_invalid_layers_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        ll.AdapterSpec(**spec)


def test_unknown_target_lists_close_matches():
    with pytest.raises(ValueError, match="q_proj"):
        ll.add_adapter(Tiny(), ll.AdapterSpec(targets=["q_prj"]))


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match="LayerNorm"):
        ll.add_adapter(Tiny(), ll.AdapterSpec(targets=["norm"]))


@pytest.mark.parametrize("field, value", [("r", 0), ("r", 2.5), ("alpha", -1), ("dropout", 1.0), ("bias", "some")])
def test_invalid_spec_values_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ll.AdapterSpec(**{field: value})


def test_unknown_method_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean: lora"):
        ll.add_adapter(Tiny(), ll.AdapterSpec(method="lorra"))


def test_unknown_option_refused_by_name():
    with pytest.raises(ValueError, match="does not take option.*'colour'"):
        ll.add_adapter(Tiny(), ll.AdapterSpec(targets=["q_proj"], options={"colour": 1}))


def test_rank_larger_than_layer_refused():
    with pytest.raises(ValueError, match="larger than"):
        ll.add_adapter(Tiny(), ll.AdapterSpec(r=17, targets=["q_proj"]))


def test_duplicate_name_refused():
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(targets=["q_proj"]), name="a")
    with pytest.raises(ValueError, match="already exists"):
        ll.add_adapter(m, ll.AdapterSpec(targets=["q_proj"]), name="a")


def test_base_frozen_and_only_active_adapter_trains():
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj"]), name="a")
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["v_proj"]), name="b")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    assert ll.trainable_parameters(m).trainable == 2 * (2 * (16 + 16))  # two v_proj layers, r=2
    ll.set_active(m, "a")
    assert all(".a." in n for n, p in m.named_parameters() if p.requires_grad)


def test_several_active_adapters_add_up():
    m = Tiny()
    x = ids()
    base = m(x)
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj", "v_proj"]), name="a")
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj", "v_proj"]), name="b")
    perturb(m, "a", 1)
    perturb(m, "b", 2)
    ll.set_active(m, ["a", "b"])
    both = m(x)
    # the same model with ΔW_a + ΔW_b merged by hand into the weights
    ref = Tiny()
    with torch.no_grad():
        for path, layer in [(n, mod) for n, mod in m.named_modules() if isinstance(mod, AdaptedLayer)]:
            delta = sum(layer.adapters[k].scale * layer.adapters[k].lora_B @ layer.adapters[k].lora_A for k in "ab")
            ref.get_submodule(path).weight += delta
    torch.testing.assert_close(both, ref(x), atol=1e-5, rtol=1e-5)
    with ll.disabled(m):
        torch.testing.assert_close(m(x), base)


def mixed_rows_equal_each_adapter_alone(device: str = "cpu") -> tuple[nn.Module, torch.Tensor, list, torch.Tensor]:
    """A LoRA and a DoRA adapter mixed row by row on `device`; returns (model, input, row names, mixed output)."""
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj", "v_proj"]), name="a")
    ll.add_adapter(m, ll.AdapterSpec(method="dora", r=3, targets=["v_proj"]), name="b")
    perturb(m, "a", 1)
    perturb(m, "b", 2)
    m.to(device)
    x = ids(5).to(device)
    alone = {}
    for name in ("a", "b"):
        ll.set_active(m, name)
        alone[name] = m(x)
    with ll.disabled(m):
        alone[None] = m(x)
    names = ["a", "b", None, "b", "a"]
    mixed = m(x, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=1e-5)
    return m, x, names, mixed


def test_mixed_rows_equal_each_adapter_alone():
    m, x, names, mixed = mixed_rows_equal_each_adapter_alone()
    with ll.row_adapters(m, names):
        torch.testing.assert_close(m(x), mixed)
    assert all(mod.row_plan is None for mod in m.modules() if isinstance(mod, AdaptedLayer))


def test_mixed_rows_unknown_adapter():
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(targets=["q_proj"]), name="a")
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        m(ids(2), adapter_names=["a", "c"])


def test_merge_equals_unmerged_and_unmerge_restores():
    m = Tiny()
    x = ids()
    w0 = m.blocks[0]["q_proj"].weight.detach().clone()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj"]), name="a")
    perturb(m, "a", 3)
    y = m(x)
    ll.merge(m, "a")
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    ll.unmerge(m)
    torch.testing.assert_close(m.blocks[0]["q_proj"].base_layer.weight, w0, atol=1e-6, rtol=0)


def test_merge_and_unload_gives_plain_model():
    m = Tiny()
    x = ids()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj"], modules_to_save=["classifier"]), name="a")
    perturb(m, "a", 3)
    y = m(x)
    plain = ll.merge_and_unload(m)
    assert not any(isinstance(mod, AdaptedLayer | SavedModule) for mod in plain.modules())
    assert set(plain.state_dict()) == set(Tiny().state_dict())
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)


def test_remove_adapter_restores_plain_layers():
    m = Tiny()
    x = ids()
    y = m(x)
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj"], modules_to_save=["classifier"]), name="a")
    perturb(m, "a", 3)
    ll.remove_adapter(m, "a")
    assert set(m.state_dict()) == set(Tiny().state_dict())
    torch.testing.assert_close(m(x), y)
    assert ll.adapter_names(m) == []


def test_modules_to_save_trains_a_copy_per_adapter():
    m = Tiny()
    x = ids()
    original = m.classifier.weight.detach().clone()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj"], modules_to_save=["classifier"]), name="a")
    assert m.classifier.copies["a"].weight.requires_grad
    assert not m.classifier.original.weight.requires_grad
    perturb(m, "a", 3)
    m(x).sum().backward()
    assert m.classifier.copies["a"].weight.grad is not None
    torch.testing.assert_close(m.classifier.original.weight, original)


def test_bias_lora_only_trains_adapted_biases():
    m = Tiny()
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["q_proj"], bias="lora_only"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "blocks.0.q_proj.base_layer.bias" in trainable
    assert "blocks.0.v_proj.bias" not in trainable


def test_conv_and_embedding_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    ll.add_adapter(net, ll.AdapterSpec(r=2, targets=["0"]))
    assert isinstance(net[0], AdaptedLayer)
    emb = nn.Sequential(nn.Embedding(10, 4))
    ll.add_adapter(emb, ll.AdapterSpec(r=2, targets=["0"]))
    assert emb(torch.tensor([[1, 2]])).shape == (1, 2, 4)
