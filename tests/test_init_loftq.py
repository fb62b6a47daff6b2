"""LoftQ (arXiv 2310.08659): base = Q = q_N(W − s·BA), s·BA = rank-r SVD of W − Q, alternated; Q + s·BA ≈ W."""

import copy
from statistics import NormalDist

import pytest
import torch
from torch import nn

import loralab as ll
from loralab.model import methods_of

# QLoRA's NF4 levels as published (Dettmers et al., arXiv 2305.14314, appendix E)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
BLOCK = 32


def reference_levels(bits: int, quantizer: str) -> torch.Tensor:
    """2^bits levels in [−1, 1]: evenly spaced, or NF: 2^(bits−1) positive and 2^(bits−1) − 1 negative
    standard-normal quantiles at probabilities evenly spaced from 0.9677083 towards ½, zero, scaled to ±1."""
    n = 2 ** bits
    if quantizer == "uniform":
        return torch.tensor([-1 + 2 * i / (n - 1) for i in range(n)])
    ppf, top = NormalDist().inv_cdf, 0.9677083
    pos = [ppf(top - (top - 0.5) * i / (n // 2)) for i in range(n // 2)]
    neg = [-ppf(top - (top - 0.5) * i / (n // 2 - 1)) for i in range(n // 2 - 1)]
    values = sorted(pos + neg + [0.0])
    return torch.tensor(values) / max(abs(v) for v in values)


def reference_quantize(w: torch.Tensor, bits: int, quantizer: str = "normal") -> torch.Tensor:
    """Block by block: divide by the largest |entry|, take the nearest level, scale back."""
    table = reference_levels(bits, quantizer)
    flat = w.flatten()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), BLOCK):
        chunk = flat[start:start + BLOCK]
        top = chunk.abs().max()
        out[start:start + BLOCK] = table[(chunk[:, None] / top - table[None]).abs().argmin(1)] * top
    return out.reshape(w.shape)


def model() -> nn.Module:
    """Two layers whose weights have decaying spectra, like trained ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 32))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            u, _, vh = torch.linalg.svd(torch.randn_like(layer.weight), full_matrices=False)
            layer.weight.copy_(u @ torch.diag(torch.logspace(0, -1.5, len(vh))) @ vh)
    return net


def loftq(original: nn.Module, r: int = 4, **options) -> tuple[nn.Module, list]:
    m = copy.deepcopy(original)
    spec = ll.AdapterSpec(r=r, alpha=2 * r, targets=["0", "2"], init="loftq",
                          init_options={"block_size": BLOCK, **options})
    ll.add_adapter(m, spec)
    return m, list(methods_of(m, "default"))


def errors(original: nn.Module, m: nn.Module, methods: list) -> list[float]:
    """‖W − (Q + s·BA)‖_F per layer, Q being the adapted model's (quantised) base."""
    with torch.no_grad():
        return [float((original.get_submodule(p).weight - m.get_submodule(p).base_layer.weight
                       - method.scale * method.lora_B @ method.lora_A).norm()) for p, method in methods]


def test_levels_are_qloras():
    from loralab.inits.loftq import levels

    torch.testing.assert_close(levels(4, "normal"), torch.tensor(NF4), atol=2e-6, rtol=0)
    for bits in (2, 3, 8):
        for quantizer in ("normal", "uniform"):
            torch.testing.assert_close(levels(bits, quantizer), reference_levels(bits, quantizer), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits, quantizer", [(2, "normal"), (4, "normal"), (4, "uniform"), (8, "normal")])
def test_one_iteration_quantizes_w_and_adapter_is_svd_of_the_rest(bits, quantizer):
    original = model()
    m, methods = loftq(original, bits=bits, quantizer=quantizer)
    for path, method in methods:
        w = original.get_submodule(path).weight.detach()
        q = m.get_submodule(path).base_layer.weight.detach()
        torch.testing.assert_close(q, reference_quantize(w, bits, quantizer), atol=1e-6, rtol=0)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        torch.testing.assert_close(method.scale * method.lora_B @ method.lora_A, u[:, :4] * s[:4] @ vh[:4],
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 4])
def test_error_never_grows_with_iterations_and_beats_quantizing_alone(bits):
    original = model()
    alone = [float((w - reference_quantize(w, bits)).norm())
             for w in (original[0].weight.detach(), original[2].weight.detach())]
    runs = [errors(original, *loftq(original, bits=bits, iterations=t)) for t in range(1, 7)]
    for layer in range(2):
        per_t = [run[layer] for run in runs]
        assert per_t[0] < alone[layer], (per_t, alone)
        assert all(later <= earlier for earlier, later in zip(per_t, per_t[1:], strict=False)), per_t
        assert per_t[-1] < per_t[0], per_t  # the alternation does help


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_block_holds_at_most_2_to_the_bits_values(bits):
    original = model()
    m, _ = loftq(original, bits=bits, iterations=3, block_size=768)  # blocks of 768 entries: 4, 2 per layer
    for path in ("0", "2"):
        blocks = m.get_submodule(path).base_layer.weight.detach().reshape(-1, 768)
        assert max(len(block.unique()) for block in blocks) <= 2 ** bits


def test_eight_bits_is_nearly_lossless():
    original = model()
    m, methods = loftq(original, bits=8, iterations=2)
    for err, (path, _) in zip(errors(original, m, methods), methods, strict=True):
        assert err < 1e-2 * float(original.get_submodule(path).weight.detach().norm()), err  # measured: 0.4%
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert (m(x) - original(x)).norm() < 1e-2 * original(x).norm()


@pytest.mark.parametrize("options, message", [
    ({"bits": 1}, "bits must be an integer from 2 to 8"),
    ({"bits": 4.0}, "bits must be an integer from 2 to 8"),
    ({"iterations": 0}, "iterations must be an integer ≥ 1"),
    ({"quantizer": "nf4"}, "quantizer must be one of normal, uniform"),
    ({"block_size": 100}, "block_size=100 must divide the 3072 weights of 0"),
    ({"group": 64}, "does not take option"),
])
def test_invalid_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        loftq(model(), **options)
