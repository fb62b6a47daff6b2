"""BOFT (arXiv 2311.06243): W' = s ⊙ (W R), R a product of butterfly-permuted block-diagonal Cayley rotations."""

import pytest
import torch
from method_harness import (
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from torch import nn

import loralab as ll
from loralab.model import methods_of

KINDS = ("linear", "hf-conv1d")
SPEC = dict(method="boft", r=2, targets=["layer"], options={"n_butterfly_factor": 2})  # 2 blocks of 6 on in=12


def cayley_block(upper: torch.Tensor, b: int) -> torch.Tensor:
    """(I + Q)(I − Q)⁻¹ for the skew Q with this strict upper triangle (row by row), written out here."""
    q = torch.zeros(b, b)
    n = 0
    for i in range(b):
        for j in range(i + 1, b):
            q[i, j], q[j, i] = upper[n], -upper[n]
            n += 1
    return (torch.eye(b) + q) @ torch.linalg.inv(torch.eye(b) - q)


def butterfly_permutation(d: int, b: int, factor: int) -> torch.Tensor:
    """P with P x = x's coordinates in block order for butterfly factor `factor` (0 = the first, F_1):
    block k joins half-block j and half-block j + 2^factor, j = (k // 2^factor)·2^(factor+1) + k mod 2^factor."""
    h, span = b // 2, 2 ** factor
    order = []
    for k in range(d // b):
        first = (k // span) * 2 * span + k % span
        for half in (first, first + span):
            order += range(half * h, (half + 1) * h)
    p = torch.zeros(d, d)
    p[torch.arange(d), torch.tensor(order)] = 1.0
    return p


def rotation(m: nn.Module) -> torch.Tensor:
    """R = F_1 ⋯ F_m with F_i = P_iᵀ blockdiag(C_i1, …, C_ir) P_i, dense, from the trained upper triangles."""
    factors, blocks, _ = m.boft_Q.shape
    d = m.layer.in_features
    b = d // blocks
    r = torch.eye(d)
    for i in range(factors):
        p = butterfly_permutation(d, b, i)
        diag = torch.block_diag(*[cayley_block(m.boft_Q[i, k].detach(), b) for k in range(blocks)])
        r = r @ (p.T @ diag @ p)
    return r


def reference(m: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return m.boft_s.detach()[:, None] * (w @ rotation(m)) - w


def test_boft(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 2 * 2 * 6 * 5 // 2 + o, kinds=KINDS)  # m·r·b(b−1)/2 + out
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=3e-2)


def test_block_size_option_sets_blocks_on_every_layer():
    spec = ll.AdapterSpec(**{**SPEC, "r": 1, "options": {"n_butterfly_factor": 2, "block_size": 6}})
    check_forward(spec, reference, kinds=("linear",))
    _, method = attached(spec, "linear")
    assert method.boft_Q.shape == (2, 2, 15)


def test_butterfly_factors_reach_every_input():
    """One factor is block-diagonal (OFT); 1 + log2(r) factors give a dense, still orthogonal R."""
    for factors, dense in ((1, False), (2, False), (3, True)):
        net = nn.Sequential(nn.Linear(16, 4))
        ll.add_adapter(net, ll.AdapterSpec(method="boft", r=4, targets=["0"], options={"n_butterfly_factor": factors}))
        (_, method), = methods_of(net, "default")
        with torch.no_grad():
            method.boft_Q.normal_()
        r = rotation(method)
        torch.testing.assert_close(r @ r.T, torch.eye(16), atol=1e-5, rtol=0)
        assert bool((r.abs() > 1e-6).all()) == dense, factors
        w = net[0].base_layer.weight.detach()
        torch.testing.assert_close(method.delta_weight(), reference(method, w), atol=1e-5, rtol=1e-5)


def test_one_factor_is_oft():
    oft_net, oft = attached(ll.AdapterSpec(method="oft", r=3, targets=["layer"]), "linear")
    spec = ll.AdapterSpec(method="boft", r=3, targets=["layer"], options={"n_butterfly_factor": 1})
    net, boft = attached(spec, "linear", randomize=False)
    with torch.no_grad():
        boft.boft_Q.copy_(oft.oft_Q[None])
    x = net.sample()
    torch.testing.assert_close(net(x), oft_net(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("r, options, message", [
    (5, {}, "r \\(blocks per butterfly factor\\) to divide in=12"),
    (1, {"block_size": 5}, "block_size must be a positive integer dividing in=12"),
    (3, {"n_butterfly_factor": 2}, "2\\^1 = 2 divides"),
    (4, {"n_butterfly_factor": 2}, "even block size"),
    (2, {"n_butterfly_factor": 0}, "n_butterfly_factor must be a positive integer"),
    (2, {"blocks": 2}, "does not take option"),
])
def test_invalid_shapes_say_what_is_allowed(r, options, message):
    with pytest.raises(ValueError, match=message):
        attached(ll.AdapterSpec(method="boft", r=r, targets=["layer"], options=options), "linear")


# ---- PEFT's BOFT format, both ways -------------------------------------------------------------
class Net16(nn.Module):
    """Linear(16 → 10) named `layer`: 4 blocks of 4 allow up to 3 butterfly factors. (PEFT's BOFT takes
    nn.Linear and nn.Conv2d only, so GPT-2's Conv1D is left out here.)"""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def peft_butterflies(monkeypatch, factors: int) -> None:
    """PEFT builds more than one butterfly factor only with its CUDA block-diagonal kernel (without it, it
    keeps one, whatever its config says); torch.block_diag stands in for that kernel so PEFT's m > 1 path runs.
    One factor runs PEFT's own CPU path."""
    import peft.tuners.boft.layer as boft_layer

    if factors == 1:
        return

    class Kernel:
        @staticmethod
        def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
            return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: Kernel)


SHAPES = [(1, {}), (2, {}), (3, {}), (2, {"block_size": 4})]


@pytest.mark.parametrize("factors, extra", SHAPES)
def test_peft_loads_loralab_boft(tmp_path, monkeypatch, factors, extra):
    from peft import PeftModel

    peft_butterflies(monkeypatch, factors)
    net = Net16()
    spec = ll.AdapterSpec(method="boft", r=4, targets=["layer"], options={"n_butterfly_factor": factors, **extra})
    ll.add_adapter(net, spec)
    (_, method), = methods_of(net, "default")
    with torch.no_grad():
        method.boft_Q.normal_(0, 0.3)
        method.boft_s.normal_(1, 0.2)
    ll.save_adapter(net, tmp_path)
    x = torch.randn(3, 5, 16)
    theirs = PeftModel.from_pretrained(Net16(), tmp_path).eval()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factors, extra", SHAPES)
def test_loralab_loads_peft_boft(tmp_path, monkeypatch, factors, extra):
    from peft import BOFTConfig, get_peft_model

    peft_butterflies(monkeypatch, factors)
    size = extra.get("block_size", 0)
    config = BOFTConfig(target_modules=["layer"], boft_block_size=size, boft_block_num=0 if size else 4,
                        boft_n_butterfly_factor=factors, init_weights=False)
    theirs = get_peft_model(Net16(), config).eval()  # init_weights=False: random R (not skew) and s
    theirs.save_pretrained(tmp_path)
    net = ll.load_adapter(Net16(), tmp_path)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_peft_without_its_kernel_writes_one_factor_and_loralab_says_so(tmp_path):
    from peft import BOFTConfig, get_peft_model

    config = BOFTConfig(target_modules=["layer"], boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2)
    with pytest.warns(UserWarning):
        get_peft_model(Net16(), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds 1 butterfly factors but the config says n_butterfly_factor=2"):
        ll.load_adapter(Net16(), tmp_path)
