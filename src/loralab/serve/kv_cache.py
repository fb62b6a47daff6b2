"""A KV cache whose rows keep their own lengths, for continuous batching.

Each running sequence owns one row of a preallocated buffer per layer, [rows, kv_heads,
length capacity, head_dim], and keeps its tokens in columns [0, length) — a per-sequence
cache as in vLLM (Kwon et al., arXiv 2309.06180), without the paging. A forward pass over
rows [start, stop) writes each row's T new keys/values at columns length … length+T-1 and
attends over columns [0, longest + T) through a mask that hides, for every query, the
columns past its own position; the position ids are each row's own. So rows of different
lengths are exact without left-padding, a prefill batch is simply right-padded (pads sit
past the prompt and are never attended to), rows join in the next free rows and leave by
moving the last row into the hole, touching no other row.

It is a transformers `Cache`, passed as the decoder's cache argument together with the 4D
mask and position ids from `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class _Plan:
    start: int
    stop: int
    rows: torch.Tensor  # [n, 1] buffer rows written
    cols: torch.Tensor  # [n, T] columns written
    kv_len: int  # columns attended over


class _RowLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, owner: RowKVCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, dim = key_states.shape
        shape = (self.owner.max_rows, heads, self.owner.capacity, dim)
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape[:3] + (value_states.shape[-1],))
        self.is_initialized = True

    def _grow(self, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[2] < self.owner.capacity:
            self._grow(self.owner.capacity)
        plan = self.owner.plan
        self.keys[plan.rows, :, plan.cols] = key_states.transpose(1, 2)
        self.values[plan.rows, :, plan.cols] = value_states.transpose(1, 2)
        rows, cols = slice(plan.start, plan.stop), slice(0, plan.kv_len)
        return self.keys[rows, :, cols], self.values[rows, :, cols]

    def move_row(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.plan.kv_len, 0

    def get_seq_length(self) -> int:
        return max(self.owner.lengths, default=0)

    def get_max_length(self) -> int:
        return self.owner.max_len


class RowKVCache(Cache):
    """Per-row KV cache for up to `max_rows` sequences of at most `max_len` tokens each."""

    def __init__(self, num_layers: int, max_rows: int, max_len: int, initial_capacity: int = 64) -> None:
        super().__init__(layers=[_RowLayer(self) for _ in range(num_layers)])
        self.max_rows = max_rows
        self.max_len = max_len
        self.capacity = min(initial_capacity, max_len)
        self.lengths: list[int] = []  # tokens cached per row
        self.plan: _Plan | None = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add_rows(self, n: int) -> int:
        """Append n empty rows; returns the first one's index."""
        if self.rows + n > self.max_rows:
            raise ValueError(f"the cache holds at most {self.max_rows} rows; {self.rows} are taken, {n} asked for")
        self.lengths += [0] * n
        return self.rows - n

    def prepare(self, start: int, stop: int, new_tokens: int, device: torch.device | str,
                float_mask: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan a pass over rows [start, stop) with `new_tokens` tokens each: (position_ids [n, T],
        attention mask [n, 1, T, kv_len]: bool, or additive in `float_mask` for eager attention)."""
        lengths = torch.tensor(self.lengths[start:stop], dtype=torch.long, device=device)
        positions = lengths[:, None] + torch.arange(new_tokens, device=device)
        kv_len = max(self.lengths[start:stop]) + new_tokens
        if kv_len > self.max_len:
            raise ValueError(f"a row would hold {kv_len} tokens; this cache holds at most {self.max_len}")
        while self.capacity < kv_len:
            self.capacity = min(2 * self.capacity, self.max_len)
        rows = torch.arange(start, stop, device=device)[:, None]
        self.plan = _Plan(start, stop, rows, positions, kv_len)
        mask = torch.arange(kv_len, device=device) <= positions[:, None, :, None]
        if float_mask is not None:
            mask = torch.zeros(mask.shape, dtype=float_mask, device=device).masked_fill_(
                ~mask, torch.finfo(float_mask).min)
        return positions, mask

    def advance(self, start: int, counts: list[int]) -> None:
        """Rows start, start+1, … now hold `counts` more real tokens each."""
        for i, n in enumerate(counts):
            self.lengths[start + i] += n
        self.plan = None

    def clear(self) -> None:
        """Forget every row (the buffers stay allocated)."""
        self.lengths.clear()
        self.plan = None

    def remove_row(self, i: int) -> None:
        """Drop row i, moving the last row into its place."""
        last = self.rows - 1
        if i != last:
            for layer in self.layers:
                layer.move_row(last, i, self.lengths[last])
            self.lengths[i] = self.lengths[last]
        self.lengths.pop()
