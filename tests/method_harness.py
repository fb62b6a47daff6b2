"""Shared checks every adapter method's test file runs (issue: one method = one file + one test).

Each test file supplies its ΔW written independently from the paper's equation; these
helpers build small random layers of every supported type and check the method's unmerged
forward, merge/unmerge, parameter count, save/load and a few training steps against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab as ll
from loralab.model import methods_of

KINDS = ("linear", "hf-conv1d", "conv", "embedding")
EMBED_SCALE = 2.5
# reference(method, W) -> the method's ΔW in canonical [out, in] form, computed in the test
Reference = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class ScaledEmbedding(nn.Embedding):
    """A lookup times a fixed factor, as transformers' scaled word embeddings (BART's, Gemma 3's) compute it."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__(num, dim)
        self.embed_scale = EMBED_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


def with_scaled(kinds) -> tuple[str, ...]:
    """The kinds, and a scaled embedding too where they hold the embedding."""
    return (*kinds, "scaled-embedding") if "embedding" in kinds else tuple(kinds)


class Net(nn.Module):
    """One base layer named `layer`, plus a fixed readout so training has a target."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        if kind == "linear":
            self.layer = nn.Linear(12, 10)
        elif kind == "hf-conv1d":
            self.layer = Conv1D(10, 12)  # nf=out, nx=in
            nn.init.normal_(self.layer.bias)
        elif kind == "conv":
            self.layer = nn.Conv2d(3, 10, 3, padding=1)
        elif kind == "embedding":
            self.layer = nn.Embedding(20, 10)
        elif kind == "scaled-embedding":
            self.layer = ScaledEmbedding(20, 10)
        else:
            raise ValueError(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def sample(self, n: int = 4, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "conv":
            return torch.randn(n, 3, 6, 6, generator=g)
        if self.kind.endswith("embedding"):
            return torch.randint(0, 20, (n, 5), generator=g)
        return torch.randn(n, 5, 12, generator=g)


def base_matrix(net: Net) -> torch.Tensor:
    """W in canonical [out, in] form, from the plain layer (written here, not via loralab)."""
    w = net.layer.base_layer.weight if hasattr(net.layer, "base_layer") else net.layer.weight
    if net.kind in ("hf-conv1d", "embedding", "scaled-embedding"):
        return w.detach().T.clone()
    return w.detach().reshape(w.shape[0], -1).clone()


def dense_forward(net: Net, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The layer's output with canonical weight `matrix`, written directly with torch ops."""
    base = net.layer.base_layer if hasattr(net.layer, "base_layer") else net.layer
    if net.kind == "embedding":
        return matrix.T[x]
    if net.kind == "scaled-embedding":
        return matrix.T[x] * EMBED_SCALE
    if net.kind == "conv":
        return nn.functional.conv2d(x, matrix.reshape(base.weight.shape), base.bias, padding=1)
    return x @ matrix.T + base.bias


def attached(spec: ll.AdapterSpec, kind: str, seed: int = 0, randomize: bool = True) -> tuple[Net, nn.Module]:
    net = Net(kind, seed)
    ll.add_adapter(net, spec, name="a")
    (_, method), = list(methods_of(net, "a"))
    if randomize:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in method.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net, method


def check_forward(spec: ll.AdapterSpec, reference: Reference, kinds=KINDS, atol: float = 1e-4) -> None:
    for kind in with_scaled(kinds):
        net, method = attached(spec, kind)
        x = net.sample()
        w = base_matrix(net)
        expected = dense_forward(net, x, w + reference(method, w))
        got = net(x)
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4, msg=f"forward on {kind}")
        torch.testing.assert_close(method.delta_weight(), reference(method, w), atol=atol, rtol=1e-4,
                                   msg=f"delta_weight on {kind}")


def check_merge_roundtrip(spec: ll.AdapterSpec, kinds=KINDS, atol: float = 1e-4) -> None:
    for kind in with_scaled(kinds):
        net, _ = attached(spec, kind)
        x = net.sample()
        w0 = base_matrix(net)
        unmerged = net(x)
        ll.merge(net, "a")
        torch.testing.assert_close(net(x), unmerged, atol=atol, rtol=1e-4, msg=f"merged output on {kind}")
        ll.unmerge(net)
        torch.testing.assert_close(base_matrix(net), w0, atol=1e-5, rtol=1e-5, msg=f"unmerge on {kind}")
        torch.testing.assert_close(net(x), unmerged, atol=atol, rtol=1e-4)


def check_param_count(spec: ll.AdapterSpec, formula: Callable[[int, int], int], kinds=KINDS) -> None:
    """formula(in, out) is the paper's count for one layer of canonical shape [out, in]."""
    for kind in kinds:
        net, method = attached(spec, kind, randomize=False)
        w = base_matrix(net)
        want = formula(w.shape[1], w.shape[0])
        assert ll.trainable_parameters(net).trainable == want, kind
        shared = type(method).expected_shared_params(spec, [method.layer])
        assert method.expected_trainable_params() + shared == want, kind


def check_save_load(spec: ll.AdapterSpec, tmp_path, kinds=KINDS) -> None:
    for kind in kinds:
        net, _ = attached(spec, kind)
        x = net.sample()
        want = net(x)
        ll.save_adapter(net, tmp_path / kind, name="a")
        fresh = Net(kind)
        ll.load_adapter(fresh, tmp_path / kind, name="a")
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0, msg=f"reloaded output on {kind}")


def check_training_lowers_loss(spec: ll.AdapterSpec, kind: str = "linear", steps: int = 30, lr: float = 1e-2) -> None:
    """Regression towards the output of the same adapter with randomly moved parameters, a
    target every method can reach by construction: the loss must go down."""
    net, _ = attached(spec, kind, randomize=False)
    teacher, _ = attached(spec, kind, randomize=True)
    x = net.sample(16)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


class Stack(nn.Module):
    """Three layers, nn.Linear or GPT-2's Conv1D, wider than tall (a: 16 → 12), square (b: 12 → 12) and taller
    than wide (c: 12 → 20): for methods whose layers slice matrices shared across them (VeRA, RandLoRA)."""

    def __init__(self, kind: str = "linear") -> None:
        super().__init__()
        torch.manual_seed(0)
        make = nn.Linear if kind == "linear" else (lambda i, o: Conv1D(o, i))
        self.a, self.b, self.c = make(16, 12), make(12, 12), make(12, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def randomise_trainables(model: nn.Module) -> nn.Module:
    """Every trainable tensor of `model` drawn at random (no path can shortcut a zero factor); returns it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def check_peft_reads(tmp_path, ours: nn.Module, fresh: Callable[[], nn.Module], x: torch.Tensor) -> None:
    """PEFT's PeftModel.from_pretrained, on the adapter loralab saves from `ours`, computes what `ours` does."""
    from peft import PeftModel

    ours.eval()
    ll.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(fresh(), tmp_path).eval()
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def check_reads_peft(tmp_path, config, fresh: Callable[[], nn.Module], x: torch.Tensor) -> nn.Module:
    """loralab loads what PEFT saves for `config` (its trainables randomised) and computes the same; returns it."""
    from peft import get_peft_model

    theirs = get_peft_model(fresh(), config)
    randomise_trainables(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    net = ll.load_adapter(fresh(), tmp_path).eval()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    return net


def check_same_file_as_peft(tmp_path, theirs: nn.Module, ours: nn.Module, fields: tuple[str, ...],
                            exact: bool = True) -> None:
    """PEFT's model `theirs` and loralab's `ours` (the same settings) save files with the same tensor names and
    shapes (`exact`: the same values, to the bit: bases drawn and trainables started as PEFT does) and
    the same values of these config fields."""
    theirs.save_pretrained(tmp_path / "peft")
    ll.save_adapter(ours, tmp_path / "ours")
    peft_tensors, our_tensors = (ll.read_tensors(tmp_path / side) for side in ("peft", "ours"))
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}
    for key in peft_tensors if exact else ():
        torch.testing.assert_close(our_tensors[key], peft_tensors[key], atol=0, rtol=0, msg=key)
    peft_config, config = (ll.read_config(tmp_path / side) for side in ("peft", "ours"))
    assert {f: config[f] for f in fields} == {f: peft_config[f] for f in fields}
