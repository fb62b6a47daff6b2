"""Mixed-adapter LoRA for a batch whose rows use different adapters, without merging.

The loaded adapters of one layer are stacked, A as [n, r_max, in] and B as [n, out, r_max]
with each adapter's scale folded into B and smaller ranks padded with zeros, so adapters of
different ranks share one batch. Row i uses slot idx[i] (−1: the base model alone).

- `bgmv` (Punica's batched gather matrix-vector product): gather every row's A and B and do
  two batched matmuls; the cost does not depend on how the rows mix adapters.
- `sgmv` (segmented, as in S-LoRA/Punica): sort rows by slot and do one pair of matmuls per
  segment; cheaper when many rows share few adapters.
Both return the change to add to the base output, [..., out] for x [..., in] (rows on dim 0).
"""

from __future__ import annotations

import torch


def stack_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(A [r_i, in], B [out, r_i], scale_i)] → (A [n, r_max, in], B [n, out, r_max]), scale in B, zero-padded."""
    r_max = max(a.shape[0] for a, _, _ in factors)
    a_stack = torch.zeros(len(factors), r_max, factors[0][0].shape[1], dtype=factors[0][0].dtype)
    b_stack = torch.zeros(len(factors), factors[0][1].shape[0], r_max, dtype=factors[0][1].dtype)
    for i, (a, b, scale) in enumerate(factors):
        a_stack[i, : a.shape[0]] = a
        b_stack[i, :, : b.shape[1]] = scale * b
    return a_stack, b_stack


def bgmv(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, T, in]
    slot = idx.clamp_min(0)
    h = torch.bmm(rows, a_stack[slot].transpose(1, 2))  # [N, T, r]
    out = torch.bmm(h, b_stack[slot].transpose(1, 2))  # [N, T, out]
    out = out * (idx >= 0).to(out.dtype)[:, None, None]
    return out.reshape(*x.shape[:-1], b_stack.shape[1])


def sgmv(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(*x.shape[:-1], b_stack.shape[1])
    for slot in idx.unique().tolist():
        if slot < 0:
            continue
        rows = (idx == slot).nonzero().squeeze(1)
        part = x.index_select(0, rows)
        out.index_copy_(0, rows, part @ a_stack[slot].T @ b_stack[slot].T)
    return out
