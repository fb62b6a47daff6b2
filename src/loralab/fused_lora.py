"""A linear layer and its low-rank update as one autograd step: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ,
or with a per-row gain g, y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b (DoRA, arXiv 2402.09353, where
g = m / ‖W + sBA‖_row is computed by the caller).

LoRA's unmerged path (Hu et al., arXiv 2106.09685) written with autograd ops costs more than
its arithmetic: the update is added out of place (a fresh output-sized tensor), and in the
backward autograd computes the input gradient of the base and of the update separately and
then adds them (two more input-sized tensors). Here the update is added in place into the
base output, and the backward writes dx = dy W once and adds s·(dy B) A into it in place, so
the only extra work is the four thin products. The frozen base weight gets no gradient.

With adapter dropout the update sees a dropped copy of x: it is passed as `dropped`, and its
gradient is returned separately so autograd takes it back through the dropout mask. With a
gain the pre-gain output is kept for the gain's gradient, as the unfused DoRA keeps it.
"""

from __future__ import annotations

import torch


def _forward(x, dropped, weight, bias, a, b, scale, gain):
    """(y, what the backward needs): the rows of x flattened to one matrix, the update added in place."""
    x2 = x.reshape(-1, x.shape[-1])
    d2 = x2 if dropped is None else dropped.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight.T) if bias is None or gain is not None else torch.addmm(bias, x2, weight.T)
    t = torch.mm(d2, a.T)
    y.addmm_(t, b.T, alpha=scale)
    z = None
    if gain is not None:
        z = y
        y = z * gain if bias is None else torch.addcmul(bias, z, gain)
    return y.view(*x.shape[:-1], weight.shape[0]), (d2, t, z)


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dropped, weight, bias, a, b, scale, gain):
        y, (d2, t, z) = _forward(x, dropped, weight, bias, a, b, scale, gain)
        ctx.save_for_backward(d2, t, weight, a, b, gain, z)
        ctx.scale, ctx.x_shape, ctx.shared_input = scale, x.shape, dropped is None
        return y

    @staticmethod
    def backward(ctx, dy):
        d2, t, weight, a, b, gain, z = ctx.saved_tensors
        need_x, need_dropped, _, _, need_a, need_b, _, need_gain = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dgain = None
        if gain is not None:
            if need_gain:
                dgain = (dy2 * z).sum(0)
            dy2 = dy2 * gain
        g = torch.mm(dy2, b).mul_(ctx.scale)  # s·(dy B): the gradient at the rank-r bottleneck
        dx = dd = da = db = None
        if need_x:
            dx = torch.mm(dy2, weight)
            if ctx.shared_input:
                dx.addmm_(g, a)
            dx = dx.view(ctx.x_shape)
        if need_dropped:
            dd = torch.mm(g, a).view(ctx.x_shape)
        if need_a:
            da = torch.mm(g.T, d2)
        if need_b:
            db = torch.mm(dy2.T, t).mul_(ctx.scale)
        return dx, dd, None, None, da, db, None, dgain


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float, dropped: torch.Tensor | None = None,
                gain: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + bias + scale·(dropped Aᵀ) Bᵀ with `weight` the canonical [out, in] matrix (frozen) and
    `dropped` the adapter's input after dropout (None: x itself); with `gain` [out], the sum before
    the bias is scaled per output row. Under autocast the operands are cast to the autocast dtype
    first, as F.linear would cast them."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, a, b = (v.to(dtype) for v in (x, weight, a, b))
        bias, dropped, gain = (None if v is None else v.to(dtype) for v in (bias, dropped, gain))
    args = (x, dropped, weight, bias, a, b, scale, gain)
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, dropped, a, b, gain)):
        return _LowRankLinear.apply(*args)
    return _forward(*args)[0]  # inference: no autograd node to build
