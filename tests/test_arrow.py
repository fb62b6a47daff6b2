"""Arrow routing (arXiv 2405.11157) and GenKnowSub against the routing written here from dense ΔW's SVD,
and against PEFT's create_arrow_model on the same experts."""

import pytest
import torch
from method_harness import randomise_trainables
from peft import PeftModel
from peft.tuners.lora import ArrowConfig, create_arrow_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.compose import add_arrow

EXPERTS, GENERAL = ["e0", "e1", "e2"], ["g0", "g1"]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10))


def with_experts(model: nn.Module, names: list[str], targets: list[str]) -> nn.Module:
    for i, name in enumerate(names):  # each randomised while it is the active (trainable) one
        torch.manual_seed(10 + i)
        randomise_trainables(ll.add_adapter(model, ll.AdapterSpec(method="lora", r=3, alpha=3 + i, targets=targets),
                                            name=name))
    return model


def routed(layer: nn.Module, x: torch.Tensor, top_k: int, temperature: float, general: list[str]) -> torch.Tensor:
    """The layer's output under Arrow, from each expert's dense ΔW and its full SVD."""
    experts = [layer.adapters[n] for n in EXPERTS]
    mean_a = torch.stack([layer.adapters[g].lora_A for g in general]).mean(0) if general else 0
    mean_b = torch.stack([layer.adapters[g].lora_B for g in general]).mean(0) if general else 0
    deltas = [e.scale * (e.lora_B - mean_b) @ (e.lora_A - mean_a) for e in experts]
    protos = torch.stack([torch.linalg.svd(d / e.scale)[2][0] for d, e in zip(deltas, experts)])
    scores = (x @ protos.T).abs()
    top, index = scores.topk(top_k, dim=-1)
    weights = torch.zeros_like(scores).scatter(-1, index, (top / temperature).softmax(-1))
    out = layer.base_layer(x)
    for e, d in enumerate(deltas):
        out = out + weights[..., e:e + 1] * (x @ d.T)
    return out


@pytest.mark.parametrize(("top_k", "temperature", "general"), [(2, 1.0, []), (1, 0.5, []), (3, 2.0, []),
                                                                (2, 1.0, GENERAL)])
def test_routing_equals_the_dense_definition(top_k, temperature, general):
    model = with_experts(net(), [*EXPERTS, *general], ["0"])
    add_arrow(model, EXPERTS, top_k=top_k, temperature=temperature, general=general)
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), routed(model[0], x, top_k, temperature, general), atol=1e-5, rtol=1e-5)


def test_an_expert_without_a_change_scores_zero_as_in_peft():
    model = with_experts(net(), EXPERTS, ["0"])
    with torch.no_grad():
        model[0].adapters["e1"].lora_B.zero_()
    add_arrow(model, EXPERTS, top_k=1)
    arrow = model[0].adapters["arrow"]
    a_s, b_s, _, sources = arrow.factors()
    assert torch.equal(arrow.prototypes(a_s, b_s, sources)[1], torch.zeros(12))


def test_experts_keep_their_own_output_and_prototypes_follow_their_changes():
    model = with_experts(net(), [*EXPERTS, *GENERAL], ["0"])
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(4))
    ll.set_active(model, "e1")
    alone = model(x)
    add_arrow(model, EXPERTS, top_k=2, general=GENERAL)
    model(x)
    ll.set_active(model, "e1")
    torch.testing.assert_close(model(x), alone)  # GenKnowSub left the expert as it was
    ll.set_active(model, "arrow")
    with torch.no_grad():
        model[0].adapters["e0"].lora_B.mul_(3.0)
        torch.testing.assert_close(model(x), routed(model[0], x, 2, 1.0, GENERAL), atol=1e-5, rtol=1e-5)


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("gks", [False, True])
def test_same_logits_as_peft_arrow(tmp_path, monkeypatch, gks):
    """PEFT estimates each prototype by 15 power iterations; run to convergence (500) it routes as loralab's
    exact singular vectors do."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    estimate = ArrowLoraLinearLayer.top_right_singular_vec_from_BA
    monkeypatch.setattr(ArrowLoraLinearLayer, "top_right_singular_vec_from_BA",
                        lambda self, a, b: estimate(self, a, b, iters=500))
    names = [*EXPERTS, *(GENERAL if gks else [])]
    saved = with_experts(llama(), names, TARGETS)
    for n in names:
        ll.save_adapter(saved, tmp_path / n, name=n)
    config = ArrowConfig(top_k=2, router_temperature=0.7, use_gks=gks, rng_seed=0)
    theirs = create_arrow_model(llama(), [str(tmp_path / n) for n in EXPERTS], config,
                                general_adapter_paths=[str(tmp_path / g) for g in GENERAL] if gks else None).eval()
    ours = llama()
    for n in names:
        ll.load_adapter(ours, tmp_path / n, name=n)
    add_arrow(ours, EXPERTS, top_k=2, temperature=0.7, general=GENERAL if gks else None)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)
    assert isinstance(theirs, PeftModel)


def test_saved_router_reloads_over_its_experts(tmp_path):
    model = with_experts(llama(), EXPERTS, TARGETS)
    add_arrow(model, EXPERTS, top_k=2)
    want = model(input_ids=IDS).logits
    for n in [*EXPERTS, "arrow"]:
        ll.save_adapter(model, tmp_path / n, name=n)
    fresh = llama()
    for n in [*EXPERTS, "arrow"]:
        ll.load_adapter(fresh, tmp_path / n, name=n)
    torch.testing.assert_close(fresh(input_ids=IDS).logits, want)


def test_bad_input_is_refused():
    model = with_experts(net(), EXPERTS, ["0"])
    ll.add_adapter(model, ll.AdapterSpec(method="dora", r=2, targets=["0"]), name="d")
    with pytest.raises(ValueError, match=r"plain LoRA adapters; \['d'\]"):
        model(torch.randn(2, 12)) if add_arrow(model, [*EXPERTS, "d"]) else None
    for options, message in [({"experts": []}, "needs options"), ({"experts": EXPERTS, "top_k": 4}, "top_k"),
                             ({"experts": EXPERTS, "temperature": 0}, "temperature")]:
        with pytest.raises(ValueError, match=message):
            ll.add_adapter(model, ll.AdapterSpec(method="arrow", targets=["0"], options=options), name="bad")
    with pytest.raises(ValueError, match="dropout does not apply"):
        ll.add_adapter(model, ll.AdapterSpec(method="arrow", targets=["0"], dropout=0.1, options={"experts": EXPERTS}),
                       name="bad2")
    with pytest.raises(ValueError, match="no single ΔW"):
        ll.merge(model, "arrow")


def test_a_bfloat16_base_and_experts_route_as_in_float32():
    model = with_experts(net(), EXPERTS, ["0"])
    add_arrow(model, EXPERTS, top_k=2)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = routed(model[0], x, 2, 1.0, [])
        got = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
