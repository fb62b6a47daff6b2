"""LoRA on bare parameters (loralab.param_targets, PEFT's target_parameters): outputs and gradients
against W + ΔW written here from the layout PEFT uses (expert e: rows e·r… of A, columns e, E + e, … of
B), checkpoints against what `peft` itself saves and loads on real transformers MoE models (Mixtral's
[E, out, in] experts, gpt-oss's transposed [E, in, out] ones), merging, several adapters, and the errors."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM

import loralab as ll
from loralab.inspect_adapter import summarize
from loralab.param_targets import ParamAdapters
from loralab.serve.attached import attach_unstackable

E, IN, OUT, R = 3, 5, 4, 2


class Experts(nn.Module):
    """E experts on E groups of rows: y[e] = x[e] W[e]ᵀ with W [E, out, in], or x[e] W[e] with W [E, in, out]
    when transposed; a 1-D gain after them."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        self.weight = nn.Parameter(torch.randn(*((E, IN, OUT) if transposed else (E, OUT, IN))))
        self.gain = nn.Parameter(torch.rand(OUT) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.is_transposed else self.weight.transpose(1, 2)
        return torch.bmm(x, w) * self.gain


class Net(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.block = Experts(transposed)
        self.proj = nn.Linear(IN, IN)  # a plain layer beside it
        self.weight_user = WeightUser()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_user(self.block(self.proj(x)))


class WeightUser(nn.Module):
    """A 2-D parameter used as a linear weight by the module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.w)


def adapted(transposed: bool = False, **spec) -> tuple[Net, Net]:
    torch.manual_seed(0)
    base = Net(transposed)
    model = copy.deepcopy(base)
    ll.add_adapter(model, ll.AdapterSpec(**{"r": R, "alpha": 3.0, "targets": [],
                                            "target_parameters": ["block.weight", "weight_user.w"], **spec}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return base, model


def updates(model: nn.Module, name: str = "default"):
    return model.block.adapters[name]["weight"], model.weight_user.adapters[name]["w"]


def expert_delta(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, transposed: bool) -> torch.Tensor:
    """ΔW_e = s·B_e A_e, B_e = B's columns e, E + e, …, A_e = A's rows e·r … e·r + r − 1 (PEFT's layout)."""
    r = a.shape[0] // experts
    d = torch.stack([scale * b[:, e::experts] @ a[e * r:(e + 1) * r] for e in range(experts)])
    return d.transpose(1, 2) if transposed else d


def reference(base: Net, model: Net, x: torch.Tensor) -> torch.Tensor:
    """The base network's computation with W + ΔW written out."""
    block, user = updates(model)
    t = base.block.is_transposed
    w = base.block.weight + expert_delta(block.lora_A, block.lora_B, block.scale, E, t)
    w = w if t else w.transpose(1, 2)
    h = torch.bmm(base.proj(x), w) * base.block.gain
    return torch.nn.functional.linear(h, base.weight_user.w + user.scale * user.lora_B @ user.lora_A)


@pytest.mark.parametrize("transposed", [False, True])
def test_output_and_gradients_equal_w_plus_the_per_expert_delta(transposed):
    base, model = adapted(transposed)
    x = torch.randn(E, 6, IN)
    y, ref = model(x), reference(base, model, x)
    torch.testing.assert_close(y, ref)
    assert not torch.allclose(y, base(x))
    wrt = [p for u in updates(model) for p in (u.lora_A, u.lora_B)]
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(ref, wrt, dy)):
        torch.testing.assert_close(got, want)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "block.adapters.default.weight.lora_A", "block.adapters.default.weight.lora_B",
        "weight_user.adapters.default.w.lora_A", "weight_user.adapters.default.w.lora_B"]


def test_starts_as_the_base_and_counts_its_parameters():
    torch.manual_seed(0)
    base = Net()
    model = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(r=R, targets=[], target_parameters=["weight"]))
    x = torch.randn(E, 6, IN)
    torch.testing.assert_close(model(x), base(x))  # B = 0
    # block.weight: A [r·E, in], B [out, r·E]; proj.weight (an nn.Linear's, 2-D): A [r, in], B [in, r]
    expected = R * E * (IN + OUT) + R * (IN + IN)
    assert ll.trainable_parameters(model).trainable == expected


def test_merge_unmerge_disabled_and_two_adapters_summed():
    base, model = adapted()
    x = torch.randn(E, 6, IN)
    one = model(x)
    ll.add_adapter(model, ll.AdapterSpec(r=1, alpha=1.0, targets=[], target_parameters=["block.weight"]), name="two",
                   activate=False)
    with torch.no_grad():
        model.block.adapters["two"]["weight"].lora_B.normal_()
    ll.set_active(model, ["default", "two"])
    both = model(x)
    two = model.block.adapters["two"]["weight"]
    torch.testing.assert_close(both, reference_with(base, model, x, expert_delta(two.lora_A, two.lora_B, two.scale,
                                                                                 E, False)))
    with ll.disabled(model):
        torch.testing.assert_close(model(x), base(x))
    ll.merge(model)
    torch.testing.assert_close(model(x), both)
    ll.unmerge(model)
    torch.testing.assert_close(model.block.base_layer.weight, base.block.weight)
    torch.testing.assert_close(model(x), both)
    ll.remove_adapter(model, "two")
    ll.set_active(model, "default")
    torch.testing.assert_close(model(x), one)
    plain = ll.merge_and_unload(model)
    assert type(plain.block) is Experts and not any(isinstance(m, ParamAdapters) for m in plain.modules())
    torch.testing.assert_close(plain(x), one)


def reference_with(base: Net, model: Net, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """`reference` with one more update on the expert stack."""
    with torch.no_grad():
        base = copy.deepcopy(base)
        base.block.weight += extra
    return reference(base, model, x)


def test_removing_the_last_adapter_gives_the_module_back():
    base, model = adapted()
    ll.remove_adapter(model, "default")
    assert type(model.block) is Experts and type(model.weight_user) is WeightUser
    x = torch.randn(E, 6, IN)
    torch.testing.assert_close(model(x), base(x))


def test_attributes_of_the_module_read_through_the_wrapper():
    _, model = adapted(transposed=True)
    assert model.block.is_transposed is True
    assert model.block.gain is model.block.base_layer.gain


def test_save_and_load_round_trip_and_a_wrong_shape_names_the_tensor(tmp_path):
    base, model = adapted()
    x = torch.randn(E, 6, IN)
    ll.save_adapter(model, tmp_path / "a")
    loaded = ll.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(loaded(x), model(x))
    other = copy.deepcopy(base)
    ll.add_adapter(other, ll.AdapterSpec(r=R + 1, targets=[], target_parameters=["block.weight", "weight_user.w"]))
    ll.save_adapter(other, tmp_path / "b")
    config = (tmp_path / "b" / "adapter_config.json").read_text().replace(f'"r": {R + 1}', f'"r": {R}')
    (tmp_path / "b" / "adapter_config.json").write_text(config)
    with pytest.raises(ValueError, match=r"block\.lora_A\.weight"):
        ll.load_adapter(copy.deepcopy(base), tmp_path / "b")


def test_inspect_gives_the_norm_of_every_experts_update(tmp_path):
    _, model = adapted()
    ll.save_adapter(model, tmp_path)
    block, _ = updates(model)
    layers = {s.module: s for s in summarize(tmp_path).layers}
    want = expert_delta(block.lora_A, block.lora_B, block.scale, E, False).norm().item()
    assert layers["block"].delta_norm == pytest.approx(want, rel=1e-5)


def test_serving_refuses_it_with_the_reason(tmp_path):
    base, model = adapted()
    ll.save_adapter(model, tmp_path / "moe")
    attached, rejected = attach_unstackable(copy.deepcopy(base), tmp_path)
    assert attached == [] and "target_parameters" in rejected["moe"]


def test_mixed_adapter_rows_are_refused():
    _, model = adapted()
    with pytest.raises(RuntimeError, match="mixed-adapter batches"), ll.row_adapters(model, ["default", None, None]):
        model(torch.randn(E, 6, IN))


@pytest.mark.parametrize(("spec", "message"), [
    (dict(target_parameters=["block.wieght"]), r"matches no parameter.*block\.weight"),
    (dict(target_parameters=["gain"]), r"block\.gain has shape \(4,\)"),
    (dict(target_parameters=["proj.weight"], targets=["proj"]), "also adapted as a layer"),
    (dict(target_parameters=["top"]), "top-level module"),
    (dict(target_parameters=["block.weight"], method="dora"), "method 'lora'"),
    (dict(target_parameters=["block.weight"], dropout=0.1), "dropout"),
])
def test_bad_input_is_refused_before_anything_changes(spec, message):
    torch.manual_seed(0)
    model = Net()
    model.top = nn.Parameter(torch.zeros(2, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        ll.add_adapter(model, ll.AdapterSpec(**{"targets": [], **spec}))
    assert model.state_dict().keys() == before.keys()


def test_a_module_with_parameterised_sub_modules_is_refused():
    model = nn.Sequential(Net())
    model[0].own = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"0 holds sub-modules with parameters \(block"):
        ll.add_adapter(model, ll.AdapterSpec(targets=[], target_parameters=["0.own"]))


# ---- against PEFT, on transformers' MoE models ------------------------------------------------------------
def mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def gpt_oss() -> GptOssForCausalLM:
    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["full_attention"] * 2)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def randomise_b(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.mark.parametrize("make", [mixtral, gpt_oss])
def test_peft_loads_what_loralab_saves(tmp_path, make):
    base = make()
    ids = torch.randint(0, 64, (2, 7))
    model = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(r=2, alpha=4, targets=["q_proj"],
                                                               target_parameters=EXPERTS))
    randomise_b(model)
    ll.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = model(ids).logits
    torch.testing.assert_close(theirs(ids).logits, ours)
    assert not torch.allclose(ours, base(ids).logits, atol=1e-3)


@pytest.mark.parametrize("make", [mixtral, gpt_oss])
def test_loralab_loads_what_peft_saves(tmp_path, make):
    base = make()
    ids = torch.randint(0, 64, (2, 7))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=[], use_rslora=True,
                                                            target_parameters=EXPERTS))
    randomise_b(theirs)
    theirs.eval().save_pretrained(tmp_path)
    want = theirs(ids).logits
    ours = ll.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(ids).logits, want)
    assert not torch.allclose(want, base(ids).logits, atol=1e-3)
    ll.merge(ours)
    torch.testing.assert_close(ours(ids).logits, want)


def test_per_parameter_ranks_and_scales_round_trip_through_peft(tmp_path):
    base = mixtral()
    ids = torch.randint(0, 64, (2, 7))
    model = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(
        r=2, alpha=4, targets=[], target_parameters=EXPERTS, rank_pattern={"experts.down_proj": 3},
        alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 8}))
    assert model.model.layers[0].mlp.experts.adapters["default"]["down_proj"].lora_A.shape == (3 * 4, 24)
    randomise_b(model)
    ll.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits)
