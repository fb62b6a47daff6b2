"""Mixed-adapter LoRA for a batch whose rows use different adapters, without merging.

As in Punica (Chen et al., arXiv 2310.18547) and S-LoRA (Sheng et al., arXiv 2311.03285),
the resident adapters of one linear layer are stacked: A as [slots, r_cap, in] and B as
[slots, r_cap, out] (Bᵀ) with each adapter's scale folded into B and smaller ranks padded with
zeros, so adapters of different ranks and different target sets share one batch (a slot
whose adapter lacks the layer holds zeros and rank 0 there). Row i of a forward pass uses
slot `RowSlots.slots[i]`, or the base model alone for -1.

Three ways to add the rows' low-rank updates to the base output:

- `add_bgmv` (Punica's batched gather matrix-vector product): gather every row's A and B
  (cut to the largest rank in use) and do two batched matmuls; the cost does not depend on
  how the rows share adapters, but the gather copies r·(in + out) numbers per row.
- `add_sgmv` (segmented gather, S-LoRA/Punica): rows sorted by slot, one pair of matmuls per
  run of rows that share a slot, each cut to that adapter's own rank.
- `add_slot_grid`: the rows scattered into a [slots, rows per slot, tokens] grid and two
  batched matmuls straight over the stacked factors of the slot range in use: no copy of the
  factors and two calls in all, but every slot of the range is read at the largest rank.

`choose_kernel` picks per call. Measured on this 2-core CPU (`bench/serve.py --kernels`,
SmolLM2-135M layer shapes): SGMV is as fast or faster than BGMV (up to 10× at decode when rows
share adapters) except when every row has an adapter of its own and the rank is small (≤ 16),
where BGMV wins by up to ~20%. With many distinct adapters at decode SGMV's two calls per
adapter dominate, and the grid takes 0.4–0.9× SGMV's time when the ranks are equal. With mixed
ranks (8–64, so half of what the grid reads is padding) it depends on threads: on one thread
the grid loses (1.6–2.3× SGMV's time), on two it is 0.83× on a 576×576 layer and 1.27× on
576×1536, since its two large calls spread over threads and SGMV's small ones do not. With few
adapters, or prefill's many tokens, the grid loses. All three reuse scratch buffers across layers.

`BatchedLoRALinear` wraps one `nn.Linear` and reads the shared `RowSlots`, which the serving
engine sets before each forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


class RowSlots:
    """The slot of every row of the next forward pass (-1: base only), shared by every wrapped layer.

    `assign` precomputes once per pass what the kernels need: the rows that use an adapter,
    those rows sorted by slot, and the runs of equal slots in that order."""

    def __init__(self, slots: Sequence[int] = (), device: torch.device | str = "cpu") -> None:
        self._scratch: dict[tuple, torch.Tensor] = {}
        self.assign(slots, device)

    def assign(self, slots: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.slots = [int(s) for s in slots]
        self.used = frozenset(s for s in self.slots if s >= 0)
        order = sorted((i for i, s in enumerate(self.slots) if s >= 0), key=lambda i: self.slots[i])
        self.order = torch.tensor(order, dtype=torch.long, device=device)
        self.lora_slots = torch.tensor([self.slots[i] for i in order], dtype=torch.long, device=device)
        self.spans: list[tuple[int, int, int]] = []  # (slot, start, stop) over `order`
        for pos, i in enumerate(order):
            if self.spans and self.spans[-1][0] == self.slots[i]:
                self.spans[-1] = (self.slots[i], self.spans[-1][1], pos + 1)
            else:
                self.spans.append((self.slots[i], pos, pos + 1))
        self.span_sizes = [stop - start for _, start, stop in self.spans]
        self.slot_range = (min(self.used), max(self.used) + 1) if self.used else (0, 0)
        self.depth = max(self.span_sizes, default=0)  # the most rows on one slot
        cells = [(slot - self.slot_range[0]) * self.depth + k for slot, start, stop in self.spans
                 for k in range(stop - start)]
        self.cells = torch.tensor(cells, dtype=torch.long, device=device)  # sorted row → cell of the slot grid

    def __len__(self) -> int:
        return len(self.slots)

    def scratch(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of `shape` for the kernels: layers run one after another, so one per key
        suffices, and reusing it spares the page faults of a fresh large allocation in every layer."""
        size = math.prod(shape)
        tag = (key, like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self._scratch.get(tag)
        if buf is None or buf.numel() < size:
            buf = self._scratch[tag] = like.new_empty(size)
        return buf[:size].view(shape)


class SlotFactors:
    """One layer's stacked factors: A as `a` [slots, r_cap, in] and B as `bt` [slots, r_cap, out]
    (stored transposed, with the scale folded in).

    B is kept as Bᵀ because h @ Bᵀ with Bᵀ row-major runs 3–4× faster on CPU than through a
    transposed view of [out, r]. `pairs[slot]` are the views (Aᵀ, Bᵀ) cut to that slot's rank
    (0 for an empty slot), kept ready so a kernel spends no calls slicing them."""

    def __init__(self, num_slots: int, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.a = torch.zeros(num_slots, 0, in_features, dtype=dtype, device=device)
        self.bt = torch.zeros(num_slots, 0, out_features, dtype=dtype, device=device)
        self.ranks = [0] * num_slots
        self._refresh()

    @classmethod
    def stack(cls, factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> SlotFactors:
        """[(A [r_i, in], B [out, r_i], scale_i)] in slots 0, 1, …"""
        a0, b0, _ = factors[0]
        out = cls(len(factors), a0.shape[1], b0.shape[0], a0.dtype, a0.device)
        for slot, (a, b, scale) in enumerate(factors):
            out.write(slot, a, b, scale)
        return out

    @torch.inference_mode()  # the engine reads these in inference mode; update them in it too
    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Put A [r, in] and scale·B [out, r] into `slot`; the rank capacity grows if r exceeds it."""
        r = a.shape[0]
        if r > self.a.shape[1]:
            grown_a = self.a.new_zeros(self.a.shape[0], r, self.a.shape[2])
            grown_bt = self.bt.new_zeros(self.bt.shape[0], r, self.bt.shape[2])
            grown_a[:, : self.a.shape[1]] = self.a
            grown_bt[:, : self.bt.shape[1]] = self.bt
            self.a, self.bt = grown_a, grown_bt
        self.a[slot].zero_()
        self.bt[slot].zero_()
        self.a[slot, :r] = a
        self.bt[slot, :r] = b.T * scale
        self.ranks[slot] = r
        self._refresh()

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.bt[slot].zero_()
        self.ranks[slot] = 0
        self._refresh()

    def _refresh(self) -> None:
        self.pairs = [(self.a[s, :r].T, self.bt[s, :r]) for s, r in enumerate(self.ranks)]

    def allocated_bytes(self) -> int:
        return (self.a.numel() + self.bt.numel()) * self.a.element_size()


def _lora_rows(x: torch.Tensor, rows: RowSlots) -> torch.Tensor:
    """x's rows that use an adapter, sorted by slot, as [rows, tokens, in] (in reused scratch memory)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.index_select(x, 0, rows.order, out=rows.scratch("x", (len(rows.order), *x.shape[1:]), x))


def _add_rows(out: torch.Tensor, rows: RowSlots, delta: torch.Tensor) -> None:
    out.view(out.shape[0], -1, out.shape[-1]).index_add_(0, rows.order, delta)


def add_bgmv(out: torch.Tensor, x: torch.Tensor, factors: SlotFactors, rows: RowSlots) -> None:
    """out[i] += B[s_i] A[s_i] x[i] for every row with a slot, by gathering each row's factors."""
    r = max(factors.ranks[s] for s in rows.used)
    n = len(rows.order)
    xs = _lora_rows(x, rows)
    a = torch.index_select(factors.a[:, :r], 0, rows.lora_slots, out=rows.scratch("a", (n, r, xs.shape[2]), xs))
    bt = torch.index_select(factors.bt[:, :r], 0, rows.lora_slots,
                            out=rows.scratch("b", (n, r, factors.bt.shape[2]), xs))
    h = torch.bmm(xs, a.transpose(1, 2))
    _add_rows(out, rows, torch.bmm(h, bt, out=rows.scratch("delta", (n, xs.shape[1], bt.shape[2]), xs)))


def add_sgmv(out: torch.Tensor, x: torch.Tensor, factors: SlotFactors, rows: RowSlots) -> None:
    """out[i] += B[s_i] A[s_i] x[i] with one pair of matmuls per run of rows sharing a slot."""
    xs = _lora_rows(x, rows)
    n, tokens = xs.shape[:2]
    delta = rows.scratch("delta", (n * tokens, factors.bt.shape[2]), xs)
    sizes = [k * tokens for k in rows.span_sizes]
    for part, part_out, (slot, _, _) in zip(xs.view(n * tokens, -1).split(sizes), delta.split(sizes), rows.spans):
        at, bt = factors.pairs[slot]
        torch.mm(part @ at, bt, out=part_out)
    _add_rows(out, rows, delta.view(n, tokens, -1))


def add_slot_grid(out: torch.Tensor, x: torch.Tensor, factors: SlotFactors, rows: RowSlots) -> None:
    """out[i] += B[s_i] A[s_i] x[i] with two batched matmuls straight over the stacked factors.

    The rows are scattered into a grid of [slots in use' range, most rows on one slot, tokens]
    (zeros elsewhere), so nothing of the factors is copied and there are two calls in all; the
    price is reading every slot of the range at the largest rank in use, and computing the
    grid's empty cells."""
    lo, hi = rows.slot_range
    r = max(factors.ranks[s] for s in rows.used)
    xs = _lora_rows(x, rows)
    tokens, d_in = xs.shape[1:]
    grid = rows.scratch("grid", ((hi - lo) * rows.depth, tokens, d_in), xs).zero_()
    grid.index_copy_(0, rows.cells, xs)
    h = torch.bmm(grid.view(hi - lo, -1, d_in), factors.a[lo:hi, :r].transpose(1, 2))
    d_out = factors.bt.shape[2]
    delta = torch.bmm(h, factors.bt[lo:hi, :r], out=rows.scratch("delta", (hi - lo, h.shape[1], d_out), xs))
    _add_rows(out, rows, delta.view(-1, tokens, d_out).index_select(0, rows.cells))


Kernel = Callable[[torch.Tensor, torch.Tensor, SlotFactors, RowSlots], None]
BGMV_MAX_RANK = 16
GRID_MIN_SPANS = 8  # below this SGMV's calls cost less than reading a whole slot range
GRID_MAX_CELLS = 4  # rows on one slot × tokens per row: beyond it the grid's empty cells cost too much
# The ranks in use over the range's slots × the largest rank, by intra-op threads: the grid's few
# large bmm calls spread over threads and SGMV's many small ones do not, so with one thread the
# grid pays for its padding only when the ranks are nearly equal.
GRID_MIN_FILL_ONE_THREAD, GRID_MIN_FILL_THREADED = 0.75, 0.4


def choose_kernel(rows: RowSlots, factors: SlotFactors, tokens: int = 1) -> Kernel:
    """The slot grid when many adapters fill most of their slot range at decode; BGMV when every
    row has an adapter of its own and the ranks in use are small; else SGMV."""
    ranks = [factors.ranks[s] for s in rows.used]
    lo, hi = rows.slot_range
    min_fill = GRID_MIN_FILL_ONE_THREAD if torch.get_num_threads() == 1 else GRID_MIN_FILL_THREADED
    if (len(rows.spans) >= GRID_MIN_SPANS and rows.depth * tokens <= GRID_MAX_CELLS
            and sum(ranks) >= min_fill * (hi - lo) * max(ranks)):
        return add_slot_grid
    if len(rows.spans) == len(rows.order) and max(ranks) <= BGMV_MAX_RANK:
        return add_bgmv
    return add_sgmv


class BatchedLoRALinear(nn.Module):
    """An nn.Linear plus the stacked LoRA factors of every pool slot; rows pick slots via `RowSlots`.

    The factors are plain tensors on the base weight's device: move the model before stacking adapters."""

    def __init__(self, base_layer: nn.Linear, rows: RowSlots, num_slots: int) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"BatchedLoRALinear wraps nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        object.__setattr__(self, "rows", rows)  # shared by every wrapped layer, not a submodule
        w = base_layer.weight
        self.factors = SlotFactors(num_slots, base_layer.in_features, base_layer.out_features, w.dtype, w.device)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        rows = self.rows
        if not any(self.factors.ranks[s] for s in rows.used):
            return out
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("BatchedLoRALinear serves inference only: run the model under torch.inference_mode() "
                               "or torch.no_grad() (train adapters with loralab.add_adapter instead)")
        if len(rows) != x.shape[0]:
            raise RuntimeError(f"row slots were set for {len(rows)} rows but this batch has {x.shape[0]}; "
                               "assign RowSlots for every forward pass")
        tokens = x.numel() // (x.shape[0] * x.shape[-1])
        choose_kernel(rows, self.factors, tokens)(out, x, self.factors, rows)
        return out

    def extra_repr(self) -> str:
        return f"slots={len(self.factors.ranks)}, rank_capacity={self.factors.a.shape[1]}"


def wrap_linear(model: nn.Module, path: str, rows: RowSlots, num_slots: int) -> BatchedLoRALinear:
    """The BatchedLoRALinear at `path`, putting one around the nn.Linear there if needed."""
    module = model.get_submodule(path)
    if isinstance(module, BatchedLoRALinear):
        return module
    wrapper = BatchedLoRALinear(module, rows, num_slots)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, wrapper)
    return wrapper
