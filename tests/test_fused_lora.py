"""The fused LoRA linear step (loralab.fused_lora) against y = x(W + s·BA)ᵀ + b written here with
autograd: the output and the gradients of x, A and B, with and without bias, dropout, a transposed
(GPT-2 Conv1D) weight, frozen factors, and autocast; and that the layer really takes that path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab as ll
from loralab.fused_lora import LowRankTerms, lora_linears
from loralab.layers import AdaptedLayer

FUSED = "_LowRankLinearsBackward"


class Host(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapted(layer: nn.Module, method: str = "lora", dropout: float = 0.0, r: int = 4) -> tuple[Host, nn.Module]:
    torch.manual_seed(0)
    host = Host(layer)
    ll.add_adapter(host, ll.AdapterSpec(method=method, r=r, alpha=3 * r, dropout=dropout, targets=["proj"]))
    method_module = host.proj.adapters["default"]
    with torch.no_grad():
        method_module.lora_B.normal_()  # a live update: B starts at zero
        if method == "dora":
            method_module.magnitude.mul_(torch.rand_like(method_module.magnitude) + 0.5)
    return host, method_module


def dense_reference(x, w, bias, a, b, scale, dropped=None):
    """y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ with the update as one dense ΔW = s·BA."""
    base = F.linear(x, w, bias)
    return base + F.linear(x if dropped is None else dropped, scale * (b @ a))


def dora_reference(x, w, bias, a, b, scale, m):
    """DoRA (arXiv 2402.09353): y = x W'ᵀ + b, W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, the norm a constant
    in the backward pass (the paper's §4.3)."""
    combined = w + scale * (b @ a)
    return F.linear(x, (m / combined.norm(dim=1).detach()).unsqueeze(1) * combined, bias)


def gradients(y, dy, tensors):
    return torch.autograd.grad(y, tensors, dy, allow_unused=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 12), (7, 12), (12,)])
def test_linear_output_and_gradients_equal_the_dense_formula(bias, shape):
    host, m = adapted(nn.Linear(12, 9, bias=bias))
    x = torch.randn(*shape, requires_grad=True)
    y = host(x)
    assert type(y.grad_fn).__name__ == FUSED
    w, b_ = host.proj.base_layer.weight, host.proj.base_layer.bias
    ref = dense_reference(x, w, b_, m.lora_A, m.lora_B, m.scale)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for got, want in zip(gradients(y, dy, (x, m.lora_A, m.lora_B)), gradients(ref, dy, (x, m.lora_A, m.lora_B))):
        torch.testing.assert_close(got, want)
    assert not w.requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_dora_output_and_gradients_equal_the_dense_formula(bias):
    host, m = adapted(nn.Linear(12, 9, bias=bias), method="dora")
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = host(x)
    assert type(y.grad_fn).__name__ == FUSED
    layer = host.proj.base_layer
    ref = dora_reference(x, layer.weight, layer.bias, m.lora_A, m.lora_B, m.scale, m.magnitude)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    wrt = (x, m.lora_A, m.lora_B, m.magnitude)
    for got, want in zip(gradients(y, dy, wrt), gradients(ref, dy, wrt)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("contiguous_b", [False, True])
def test_b_gets_the_dense_formulas_gradient_in_its_own_layout(contiguous_b):
    """LoRA keeps B as the transpose of a contiguous [r, out], whose gradient the backward computes as
    (s·tᵀ dy)ᵀ; a B replaced by a contiguous one takes the [out, r] product. Either way the backward hands
    autograd the gradient in B's layout (one in another would be copied across)."""
    host, m = adapted(nn.Linear(12, 9))
    if contiguous_b:
        m.lora_B = nn.Parameter(m.lora_B.detach().contiguous())
    assert m.lora_B.is_contiguous() == contiguous_b
    produced = []
    m.lora_B.register_hook(lambda grad: produced.append(grad.stride()))
    x = torch.randn(2, 5, 12)
    y = host(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    b = m.lora_B.detach().clone().requires_grad_()
    layer = host.proj.base_layer
    want, = gradients(dense_reference(x, layer.weight, layer.bias, m.lora_A.detach(), b, m.scale), dy, (b,))
    torch.testing.assert_close(m.lora_B.grad, want)
    assert produced == [m.lora_B.stride()]


@pytest.mark.parametrize("with_dropout", [False, True])
def test_dora_backward_twice_through_a_retained_graph_gives_the_same_gradients(with_dropout):
    """The backward writes into the kept pre-gain output: a second one must not read what the first left."""
    torch.manual_seed(0)
    w, a, b = torch.randn(9, 12), torch.randn(4, 12, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    m = (torch.rand(9) + 0.5).requires_grad_()
    x = torch.randn(2, 5, 12, requires_grad=True)
    norms = (w + 1.5 * (b @ a)).norm(dim=1).detach()
    dropped = F.dropout(x, 0.5, training=True) if with_dropout else None
    y = lora_linears(x, [LowRankTerms(w, None, a, b, 1.5, gain=m / norms)], dropped)[0]
    assert type(y.grad_fn).__name__ == FUSED
    dy = torch.randn_like(y)
    wrt = (x, a, b, m)
    first = torch.autograd.grad(y, wrt, dy, retain_graph=True)
    second = torch.autograd.grad(y, wrt, dy, retain_graph=True)  # (the dropout mask serves the reference too)
    combined = w + 1.5 * (b @ a)
    ref = F.linear(x, w * (m / norms).unsqueeze(1)) + F.linear(
        x if dropped is None else dropped, (m / norms).unsqueeze(1) * (combined - w))
    want = torch.autograd.grad(ref, wrt, dy)
    for got_first, got_second, expected in zip(first, second, want):
        torch.testing.assert_close(got_first, expected)
        torch.testing.assert_close(got_second, expected)


def test_gpt2_conv1d_weight_stored_transposed():
    host, m = adapted(Conv1D(9, 12))  # nf=9 outputs, nx=12 inputs, weight [12, 9]
    x = torch.randn(3, 4, 12, requires_grad=True)
    y = host(x)
    assert type(y.grad_fn).__name__ == FUSED
    conv = host.proj.base_layer
    ref = dense_reference(x, conv.weight.T, conv.bias, m.lora_A, m.lora_B, m.scale)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for got, want in zip(gradients(y, dy, (x, m.lora_A, m.lora_B)), gradients(ref, dy, (x, m.lora_A, m.lora_B))):
        torch.testing.assert_close(got, want)


def test_dropout_reaches_only_the_update_and_its_gradient_goes_back_through_the_mask():
    host, m = adapted(nn.Linear(12, 9), dropout=0.5)
    host.train()
    x = torch.randn(6, 12, requires_grad=True)
    torch.manual_seed(7)
    y = host(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    layer = host.proj.base_layer
    ref = dense_reference(x, layer.weight, layer.bias, m.lora_A, m.lora_B, m.scale, dropped)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for got, want in zip(gradients(y, dy, (x, m.lora_A, m.lora_B)), gradients(ref, dy, (x, m.lora_A, m.lora_B))):
        torch.testing.assert_close(got, want)


def test_only_the_gradients_asked_for_are_computed():
    host, m = adapted(nn.Linear(12, 9))
    host.double()  # float64: the two paths' rounding differs in float32 and the loss squares it
    m.lora_A.requires_grad_(False)  # e.g. LoRA-FA freezes A
    x = torch.randn(6, 12, dtype=torch.float64)  # the first layer's input needs no gradient
    y = host(x)
    assert type(y.grad_fn).__name__ == FUSED
    y.square().sum().backward()
    assert m.lora_A.grad is None and x.grad is None
    ref = dense_reference(x, host.proj.base_layer.weight, host.proj.base_layer.bias, m.lora_A, m.lora_B, m.scale)
    (want,) = torch.autograd.grad(ref.square().sum(), m.lora_B)
    torch.testing.assert_close(m.lora_B.grad, want)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inference_gives_the_training_output(mode):
    host, m = adapted(nn.Linear(12, 9))
    x = torch.randn(4, 12)
    want = host(x).detach()
    with mode():
        torch.testing.assert_close(host(x), want)


def test_bf16_autocast_matches_the_unfused_path_and_keeps_float32_gradients():
    host, m = adapted(nn.Linear(32, 24))
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = host(x)
        unfused = m.apply_alone(x, host.proj.base_layer(x))
    assert y.dtype == unfused.dtype == torch.bfloat16
    assert type(y.grad_fn).__name__ == FUSED
    torch.testing.assert_close(y.float(), unfused.float(), rtol=2e-2, atol=2e-2)
    (ga_fused,) = torch.autograd.grad(y.float().square().sum(), m.lora_B)
    (ga_unfused,) = torch.autograd.grad(unfused.float().square().sum(), m.lora_B)
    assert ga_fused.dtype == torch.float32
    torch.testing.assert_close(ga_fused, ga_unfused, rtol=3e-2, atol=3e-2 * ga_unfused.abs().max().item())


def test_a_trained_base_weight_still_gets_its_gradient():
    host, m = adapted(nn.Linear(12, 9))
    w = host.proj.base_layer.weight
    w.requires_grad_(True)
    x = torch.randn(5, 12)
    y = host(x)
    assert type(y.grad_fn).__name__ != FUSED
    y.sum().backward()
    (want,) = torch.autograd.grad(dense_reference(x, w, host.proj.base_layer.bias, m.lora_A, m.lora_B,
                                                  m.scale).sum(), w)
    torch.testing.assert_close(w.grad, want)


def test_variants_that_only_change_the_factors_fuse_and_those_that_change_the_forward_do_not():
    for method, fused in (("lora", True), ("dylora", True), ("sora", True), ("dora", True), ("hydra", False)):
        host, _ = adapted(nn.Linear(12, 9), method=method)
        y = host(torch.randn(3, 12, requires_grad=True))
        assert (type(y.grad_fn).__name__ == FUSED) == fused, method


def test_two_active_adapters_and_mixed_rows_take_the_usual_path():
    host, m = adapted(nn.Linear(12, 9))
    ll.add_adapter(host, ll.AdapterSpec(method="lora", r=2, targets=["proj"]), name="other")
    layer: AdaptedLayer = host.proj
    x = torch.randn(4, 12, requires_grad=True)
    ll.set_active(host, ["default", "other"])
    assert type(host(x).grad_fn).__name__ != FUSED
    ll.set_active(host, "default")
    assert type(host(x).grad_fn).__name__ == FUSED
    with ll.disabled(host):
        torch.testing.assert_close(host(x), layer.base_layer(x))


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward (as quantised layers have): the fused path must call it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_base_layer_with_its_own_forward_or_a_hook_is_called_not_bypassed():
    host, m = adapted(ScaledLinear(12, 9))
    x = torch.randn(3, 12, requires_grad=True)
    layer = host.proj.base_layer
    torch.testing.assert_close(host(x), 2 * F.linear(x, layer.weight, layer.bias) + m.delta(x))
    host, m = adapted(nn.Linear(12, 9))
    seen = []
    handle = host.proj.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    y = host(x)
    assert seen == [torch.Size([3, 9])] and type(y.grad_fn).__name__ != FUSED
    handle.remove()
    with nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(type(mod))):
        host(x)
    assert nn.Linear in seen
    assert type(host(x).grad_fn).__name__ == FUSED
