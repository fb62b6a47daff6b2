"""Sibling layers (loralab.siblings): adapted linears that read one input run as one fused step.
Outputs and gradients against y_i = x(W_i + s·B_iA_i)ᵀ + b_i written here; which layers the group
learns to join (q/k/v but not o, gate/up but not down, k/v of a cross-attention); and that every
way a model can call them otherwise (another input, a member skipped, factors changed, x changed
in place, checkpointing, dropout) still gives the layer's own output."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import loralab as ll
from loralab.layers import AdaptedLayer

GROUPED = "_LowRankLinearsBackward"


class Attention(nn.Module):
    """q, k, v read x (or k, v read `memory`: cross-attention); o reads their mix."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, 4), nn.Linear(d, 4, bias=False)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if memory is None else memory
        q, k, v = self.q(x), self.k(kv), self.v(kv)
        return self.o(q * k.sum(-1, keepdim=True) + v.mean(-1, keepdim=True))


def adapted(model: nn.Module, method: str = "lora", dropout: float = 0.0, **spec) -> nn.Module:
    torch.manual_seed(0)
    model = model.double()
    ll.add_adapter(model, ll.AdapterSpec(method=method, r=3, alpha=6, dropout=dropout, targets="all-linear", **spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a live update: B starts at zero
            if "magnitude" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    return model


def dense(layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
    m = layer.adapters["default"]
    b = m.lora_B * m.lora_gate if hasattr(m, "lora_gate") else m.lora_B  # SoRA (arXiv 2311.11696): B·diag(g)
    w = layer.base_layer.weight + m.scale * b @ m.lora_A
    if hasattr(m, "magnitude"):  # DoRA, arXiv 2402.09353: the row norm a constant in the backward
        w = (m.magnitude / w.norm(dim=1).detach()).unsqueeze(1) * w
    return F.linear(x, w, layer.base_layer.bias)


def reference(model: Attention, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
    kv = x if memory is None else memory
    q, k, v = dense(model.q, x), dense(model.k, kv), dense(model.v, kv)
    return dense(model.o, q * k.sum(-1, keepdim=True) + v.mean(-1, keepdim=True))


def trained(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def assert_matches_reference(model: Attention, x: torch.Tensor, memory: torch.Tensor | None = None,
                             tol: float | None = None) -> None:
    close = {} if tol is None else {"rtol": tol, "atol": tol}
    y, want = model(x, memory), reference(model, x, memory)
    torch.testing.assert_close(y, want, **close)
    wrt = [x, *trained(model)]
    for got, expected in zip(torch.autograd.grad(y.square().sum(), wrt),
                             torch.autograd.grad(want.square().sum(), wrt)):
        torch.testing.assert_close(got, expected, **close)


def outputs_of(model: nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, out))
               for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    model(*inputs)
    for h in handles:
        h.remove()
    return seen


def x_in(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_q_k_v_join_and_their_outputs_and_gradients_equal_the_dense_formula(method):
    model = adapted(Attention(), method)
    tol = 1e-5 if method == "dora" else None  # DoRA's row norms are float32 whatever the weights' dtype
    x = x_in(2, 5, 12)
    assert_matches_reference(model, x, tol=tol)  # the first call only watches
    out = outputs_of(model, x)
    assert out["q"].grad_fn is out["k"].grad_fn is out["v"].grad_fn
    assert type(out["q"].grad_fn).__name__ == GROUPED and out["o"].grad_fn is not out["q"].grad_fn
    assert model.q.siblings.members == (model.q, model.k, model.v)
    assert_matches_reference(model, x, tol=tol)
    assert_matches_reference(model, x_in(7, 12), tol=tol)


def test_inference_gives_the_training_output():
    model = adapted(Attention())
    x = x_in(3, 12)
    want = model(x).detach()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(model(x.detach()), want)
    torch.testing.assert_close(model(x), want)
    with torch.inference_mode():
        made_there = x.detach().clone()
    model.requires_grad_(False)  # nothing to train: an inference tensor may pass with grad mode on
    for _ in range(2):
        torch.testing.assert_close(model(made_there), want)


def test_cross_attention_joins_only_the_layers_that_read_the_memory():
    model = adapted(Attention())
    x, memory = x_in(2, 3, 12), x_in(2, 3, 12)
    model(x, memory)
    out = outputs_of(model, x, memory)
    assert out["k"].grad_fn is out["v"].grad_fn and out["q"].grad_fn is not out["k"].grad_fn
    assert_matches_reference(model, x, memory)


class MLP(nn.Module):
    def __init__(self, d: int = 12, hidden: int = 20) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_gate_and_up_join_and_down_stays_apart():
    model = adapted(MLP())
    x = x_in(4, 12)
    model(x)
    out = outputs_of(model, x)
    assert out["gate"].grad_fn is out["up"].grad_fn and out["down"].grad_fn is not out["up"].grad_fn
    want = dense(model.down, F.silu(dense(model.gate, x)) * dense(model.up, x))
    torch.testing.assert_close(model(x), want)


def test_a_member_called_on_another_input_stops_the_group_and_gets_its_own_output():
    model = adapted(Attention())
    x = x_in(2, 12)
    model(x)
    model(x)
    group = model.q.siblings
    assert group.members is not None and not group.stopped
    assert_matches_reference(model, x, x_in(2, 12))  # k and v now read another tensor
    assert group.stopped
    assert_matches_reference(model, x)


@pytest.mark.parametrize(("method", "changed"), [("lora", "lora_B"), ("dora", "magnitude"), ("sora", "lora_gate")])
def test_outputs_are_not_handed_over_after_the_factors_change(method, changed):
    model = adapted(Attention(), method)
    x = x_in(2, 12)
    model(x)
    model.q(x)  # computes k's and v's outputs too
    with torch.no_grad():
        getattr(model.k.adapters["default"], changed).add_(1.0)  # an optimiser step in between
    torch.testing.assert_close(model.k(x), dense(model.k, x))
    assert model.q.siblings.stopped


def test_outputs_are_not_handed_over_after_x_changes_in_place():
    model = adapted(Attention())
    x = torch.randn(2, 12, dtype=torch.float64)
    model(x)
    model.q(x)
    x.mul_(2)
    torch.testing.assert_close(model.k(x), dense(model.k, x))
    torch.testing.assert_close(model.v(x), dense(model.v, x))


def test_a_skipped_member_stops_the_group():
    model = adapted(Attention())
    x = x_in(2, 12)
    model(x)
    model.q(x), model.k(x)  # v never asks for its output
    model(x)
    assert model.q.siblings.stopped
    assert_matches_reference(model, x)


def test_an_output_the_loss_does_not_use_gets_no_gradient_trouble():
    model = adapted(Attention())
    x = x_in(2, 12)
    model(x)
    q, k, v = model.q(x), model.k(x), model.v(x)
    assert q.grad_fn is v.grad_fn
    (q.sum() + k.sum()).backward()  # v unused
    (want,) = torch.autograd.grad(dense(model.q, x).sum() + dense(model.k, x).sum(), x)
    torch.testing.assert_close(x.grad, want)
    grad = model.v.adapters["default"].lora_A.grad
    assert grad is None or not grad.any()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_steps(use_reentrant):
    model = adapted(Attention())
    x = x_in(2, 12)
    wrt = [x, *trained(model)]
    want = torch.autograd.grad(reference(model, x).square().sum(), wrt)
    for _ in range(3):  # the first forward is the group's first look; the recompute comes after it
        for t in wrt:
            t.grad = None
        checkpoint(model, x, use_reentrant=use_reentrant).square().sum().backward()
        for t, expected in zip(wrt, want):
            torch.testing.assert_close(t.grad, expected)


def test_dropout_in_training_keeps_each_layer_apart():
    model = adapted(Attention(), dropout=0.3)
    model.train()
    x = x_in(2, 12)
    model(x)
    out = outputs_of(model, x)
    assert out["q"].grad_fn is not out["k"].grad_fn
    model.eval()
    model(x)
    out = outputs_of(model, x)
    assert out["q"].grad_fn is out["k"].grad_fn
    assert_matches_reference(model, x)


def test_two_active_adapters_take_the_usual_path():
    model = adapted(Attention())
    ll.add_adapter(model, ll.AdapterSpec(r=2, targets="all-linear"), name="other")
    ll.set_active(model, ["default", "other"])
    x = x_in(2, 12)
    model(x)
    out = outputs_of(model, x)
    assert out["q"].grad_fn is not out["k"].grad_fn
    ll.set_active(model, "default")
    assert_matches_reference(model, x)


def test_copies_and_pickles_keep_their_own_groups():
    model = adapted(Attention())
    x = x_in(2, 12)
    model(x)
    model.q(x)  # outputs in flight: not carried over
    twin = copy.deepcopy(model)
    assert twin.q.siblings is twin.k.siblings is not model.q.siblings
    assert twin.q.siblings.members == (twin.q, twin.k, twin.v)
    assert_matches_reference(twin, x)
    assert pickle.loads(pickle.dumps(twin)).q.siblings.members is not None


def test_a_llama_block_joins_q_k_v_and_gate_up():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).double()
    ll.add_adapter(model, ll.AdapterSpec(r=4, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 64, (2, 6))
    before = model(ids).logits
    groups = {id(g): g for m in model.modules() if isinstance(m, AdaptedLayer) and (g := m.siblings)}.values()
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    assert sorted(tuple(names[m] for m in g.members) for g in groups) == sorted(
        [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * 2)
    torch.testing.assert_close(model(ids).logits, before)
