"""Linear layers and their low-rank updates as one autograd step: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ,
or with a per-row gain g, y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b (DoRA, arXiv 2402.09353, where
g = m / ‖W + sBA‖_row is computed by the caller).

LoRA's unmerged path (Hu et al., arXiv 2106.09685) written with autograd ops costs more than
its arithmetic: the update is added out of place (a fresh output-sized tensor), and in the
backward autograd computes the input gradient of the base and of the update separately and
then adds them (two more input-sized tensors). Here the update is added in place into the
base output, and the backward writes dx = dy W once and adds s·(dy B) A into it in place, so
the only extra work is the four thin products. The frozen base weight gets no gradient.

Several layers that read the same input (an attention block's q, k and v projections, an
MLP's gate and up) can go through one step together (`lora_linears`): their A factors are
stacked, so x Aᵀ, the A gradient and the update's share of dx are one product each instead of
one per layer, and dx sums the layers' dy W in place instead of autograd adding them after.
LoRA keeps B [out, r] as the transpose of a contiguous [r, out] (`b_factor_layout`): its gradient is
then (s·tᵀ dy)ᵀ, which MKL computes about twice as fast as the [out, r] product s·dyᵀ t.

With adapter dropout the update sees a dropped copy of x: it is passed as `dropped`, and its
gradient is returned separately so autograd takes it back through the dropout mask (one layer
only: each layer drops its own copy). With a gain the pre-gain output z is kept for the gain's
gradient, as the unfused DoRA keeps it. The backward writes dy ⊙ z and then dy ⊙ g into z's own
buffer, which nothing else reads: on a CPU a fresh output-sized tensor costs several times the
multiply that fills it (its pages are cold), so this saves DoRA one per layer and step. A second
backward through a retained graph finds z spent and computes it again from x (with dropout, where
x is not kept, the backward works on a copy of z instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class LowRankTerms(NamedTuple):
    """What one linear layer with a low-rank update computes (see the module docstring)."""

    weight: torch.Tensor  # canonical [out, in], frozen
    bias: torch.Tensor | None
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    gain: torch.Tensor | None = None  # [out]
    dropout: nn.Module | None = None  # applied to the update's input only


def _forward(x, dropped, scales, weights, biases, a_s, b_s, gains):
    """(outputs, what the backward needs); the rows of x flattened to one matrix, each update added in place."""
    x2 = x.reshape(-1, x.shape[-1])
    d2 = x2 if dropped is None else dropped.reshape(-1, x.shape[-1])
    a = a_s[0] if len(a_s) == 1 else torch.cat(a_s)
    t = F.linear(d2, a)
    outs, pre_gain = [], []
    for weight, bias, b, scale, gain, t_i in zip(weights, biases, b_s, scales, gains, _per_layer(t, b_s)):
        y = _base_plus_update(x2, weight, bias if gain is None else None, t_i, b, scale)
        pre_gain.append(y if gain is not None else None)
        if gain is not None:
            y = y * gain if bias is None else torch.addcmul(bias, y, gain)
        outs.append(y.view(*x.shape[:-1], weight.shape[0]))
    return outs, (d2, a, t, pre_gain)


def _base_plus_update(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor,
                      b: torch.Tensor, scale: float) -> torch.Tensor:
    """x Wᵀ + b + s·t Bᵀ, the update added in place into the base product."""
    return F.linear(x2, weight, bias).addmm_(t, b.t(), alpha=scale)


def _per_layer(t: torch.Tensor, b_s: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The stacked x Aᵀ split back into each layer's columns."""
    return (t,) if len(b_s) == 1 else t.split_with_sizes([b.shape[1] for b in b_s], dim=1)


class _LowRankLinears(torch.autograd.Function):
    """n layers on one input: apply(x, dropped, scales, n, *weights, *biases, *As, *Bs, *gains)."""

    @staticmethod
    def forward(ctx, x, dropped, scales, n, *tensors):
        weights, biases, a_s, b_s, gains = (tensors[i * n:(i + 1) * n] for i in range(5))
        outs, (d2, a, t, pre_gain) = _forward(x, dropped, scales, weights, biases, a_s, b_s, gains)
        ctx.save_for_backward(d2, a, t, *weights, *b_s, *gains, *pre_gain)  # A as stacked
        ctx.scales, ctx.n, ctx.x_shape, ctx.shared_input = scales, n, x.shape, dropped is None
        ctx.spent = [False] * n  # whether a backward has written into that layer's kept z
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n, scales = ctx.n, ctx.scales
        d2, a, t, *rest = ctx.saved_tensors
        weights, b_s, gains, pre_gain = (rest[i * n:(i + 1) * n] for i in range(4))
        needs = ctx.needs_input_grad
        need_x, need_dropped = needs[0], needs[1]
        need_a, need_b, need_gain = (needs[4 + i * n:4 + (i + 1) * n] for i in range(2, 5))
        dx = None
        gs, dbs, dgains = [], [], []
        for i, (dy, weight, b, scale, gain, z, t_i, wants_b, wants_gain) in enumerate(zip(
                dys, weights, b_s, scales, gains, pre_gain, _per_layer(t, b_s), need_b, need_gain)):
            dy2 = dy.reshape(-1, dy.shape[-1])
            dgain = None
            if gain is not None:
                if wants_gain:  # dy ⊙ z summed over rows, in z's buffer, which then takes dy ⊙ g
                    product = _writable_z(ctx, i, z, d2, weight, t_i, b, scale)
                    dgain = torch.mul(dy2, product, out=product).sum(0)
                    dy2 = torch.mul(dy2, gain, out=product)
                else:
                    dy2 = dy2 * gain
            dgains.append(dgain)
            # s·(dy B), the gradient at the rank-r bottleneck. With beta=0 addmm's first argument only
            # lends its shape, and alpha scales inside the product (a separate scalar multiply costs more).
            gs.append(torch.addmm(t_i, dy2, b, beta=0, alpha=scale))
            if need_x:
                dx = torch.mm(dy2, weight) if dx is None else dx.addmm_(dy2, weight)
            dbs.append(_b_gradient(dy2, t_i, b, scale) if wants_b else None)
        g = gs[0] if n == 1 else torch.cat(gs, dim=1)
        dd = None
        if need_x:
            if ctx.shared_input:
                dx.addmm_(g, a)
            dx = dx.view(ctx.x_shape)
        if need_dropped:
            dd = torch.mm(g, a).view(ctx.x_shape)
        das = [None] * n
        if any(need_a):
            da = torch.mm(g.t(), d2)
            das = [da] if n == 1 else list(da.split_with_sizes([b.shape[1] for b in b_s]))
        return dx, dd, None, None, *([None] * 2 * n), *das, *dbs, *dgains


def b_factor_layout(b: torch.Tensor) -> torch.Tensor:
    """B [out, r] stored as the transpose of a contiguous [r, out] (same shape, same values): the layout
    whose gradient the backward computes fastest (see _b_gradient). LoRA keeps its B so."""
    return b.t().contiguous().t()


def _b_gradient(dy: torch.Tensor, t: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s·dyᵀ t in B's own layout: for B in `b_factor_layout`, (s·tᵀ dy)ᵀ, which MKL computes about twice as
    fast as the [out, r] product, and which autograd keeps as it is (a gradient in another layout than
    its parameter's would be copied across, and that transposing copy costs nearly all the product saves)."""
    if b.stride(0) == 1:  # (also a B of rank 1, whose gradient has the one layout either way)
        return torch.addmm(b.t(), t.t(), dy, beta=0, alpha=scale).t()
    return torch.addmm(b, dy.t(), t, beta=0, alpha=scale)


def _writable_z(ctx, i: int, z: torch.Tensor, d2: torch.Tensor, weight: torch.Tensor, t: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
    """Layer i's pre-gain output z in a buffer the backward may overwrite: the kept one, once (through
    `.data`, so that autograd's version check still passes on a retained graph); after that, z computed
    again from x. A copy with dropout, where x is not kept, and under torch.compile, whose graph fuses the
    passes anyway (and may not write to the context from its backward)."""
    if not ctx.shared_input or torch.compiler.is_compiling():
        return z.clone()
    if not ctx.spent[i]:
        ctx.spent[i] = True
        return z.data
    return _base_plus_update(d2, weight, None, t, b, scale)


def _cast_for_autocast(x: torch.Tensor, terms: Sequence[LowRankTerms]) -> tuple[torch.Tensor, list[LowRankTerms]]:
    """Operands in the autocast dtype, as F.linear would cast them (when autocast is on)."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, list(terms)
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = [t._replace(weight=t.weight.to(dtype), bias=None if t.bias is None else t.bias.to(dtype),
                       a=t.a.to(dtype), b=t.b.to(dtype), gain=None if t.gain is None else t.gain.to(dtype))
            for t in terms]
    return x.to(dtype), cast


def lora_linears(x: torch.Tensor, terms: Sequence[LowRankTerms],
                 dropped: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Each layer's output for input x (see LowRankTerms), all in one step; `dropped` is the one
    layer's update input after its dropout (None: x itself; several layers take no dropout)."""
    if dropped is not None and len(terms) != 1:
        raise ValueError(f"a dropped input is one layer's own: got {len(terms)} layers")
    x, terms = _cast_for_autocast(x, terms)
    if dropped is not None:
        dropped = dropped.to(x.dtype)
    weights, biases, a_s, b_s, scales, gains, _ = zip(*terms)
    trained = (x, dropped, *a_s, *b_s, *gains)
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in trained):
        return _LowRankLinears.apply(x, dropped, scales, len(terms), *weights, *biases, *a_s, *b_s, *gains)
    return tuple(_forward(x, dropped, scales, weights, biases, a_s, b_s, gains)[0])  # inference: no node


def lora_linear(x: torch.Tensor, terms: LowRankTerms) -> torch.Tensor:
    """One layer's output for input x, its dropout (if any, and in training) on the update's input."""
    dropped = terms.dropout(x) if terms.dropout is not None else None
    return lora_linears(x, (terms,), dropped)[0]
