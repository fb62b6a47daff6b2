"""Mixed-adapter LoRA for a batch whose rows use different adapters, without merging.

As in Punica (Chen et al., arXiv 2310.18547) and S-LoRA (Sheng et al., arXiv 2311.03285),
the resident adapters of one linear layer are stacked, A as [n, cap, in] and B as [n, cap, out]
(Bᵀ) with each adapter's scale folded into B, in one stack per rank class (capacity the next
power of two, smaller ranks padded with zeros), so adapters of different ranks and different
target sets share one batch (a slot whose adapter lacks the layer has no place there). Row i of
a forward pass uses slot `RowSlots.slots[i]`, or the base model alone for -1.

Three ways to add the rows' low-rank updates to the base output:

- `add_bgmv` (Punica's batched gather matrix-vector product): per rank class, gather every
  row's A and B (cut to the largest rank in use there) and do two batched matmuls; the cost
  does not depend on how the rows share adapters, but the gather copies r·(in + out) numbers
  per row.
- `add_sgmv` (segmented gather, S-LoRA/Punica): rows sorted by slot, one pair of matmuls per
  run of rows that share a slot, each cut to that adapter's own rank.
- `add_slot_grid`: per rank class, the rows scattered into a [positions, rows per position,
  tokens] grid and two batched matmuls straight over the stack's positions in use: no copy of
  the factors and two calls per class, but every position of the range is read and every cell
  of the grid computed. A grid without empty cells (every position in use, equally often) is
  the class's rows themselves, so it is neither built nor read back.

BGMV and the grid gather every class's rows with one call and scatter the results back with
one (`RowSlots.class_order`): at decode with 64 adapters in four classes that and the
full-grid case cut the grid's time over SmolLM2's 120 q/k/v/o layers from 82 to 62 ms a step,
about what reading the 885 MB of stacked factors takes at this machine's ~17 GB/s.

`choose_kernel` picks per call. Measured on this 2-core CPU (`bench/serve.py --kernels`,
SmolLM2-135M layer shapes, one layer at a time, refitted after the grid's full-grid path): the
grid takes 0.3–0.9× SGMV's time whenever each rank class in use holds enough distinct adapters
— 2 with one class, 4 a class with several (2 a class took it 1.0–1.1× at decode) — and, with
every row on an adapter of its own at rank ≤ 16, 0.46–0.95× against BGMV's 0.57–1.1× (decode
and 16-token prefills, one or two threads). BGMV is kept for batches the grid does not fit
(few adapters a class, sparse slots) where every row has its own small-rank adapter; SGMV for
the rest (up to 10× faster than BGMV when rows share adapters). The grid gains more inside the
model than alone, where the factors of 120 layers come from memory rather than cache: in one
profiled `bench/serve.py` batch of 64 adapters (ranks 8–64, 64 rows, 2 threads) the LoRA part of
the decode steps took 1.1 s with one stack padded to rank 64 and 0.9 s with rank classes, and
of the 16-token prefill 0.40 s in SGMV against 0.19 s in the grid. Its padding costs most on
one thread (a grid half padding took 1.6–2.3× SGMV's time there, 0.8–1.3× on two, whose large
calls spread over threads while SGMV's small ones do not), hence a stricter fill on one thread.
On a GPU, where every call is a kernel launch, the rule is simpler (`GRID_MIN_PER_CLASS_GPU`).
All three reuse scratch buffers across layers.

`BatchedLoRALinear` wraps one `nn.Linear` and reads the shared `RowSlots`, which the serving
engine sets before each forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def rank_class(r: int) -> int:
    """The rank capacity of the stack that holds a rank-r adapter: the next power of two."""
    return 1 << max(r - 1, 0).bit_length()


@dataclass
class RankGroup:
    """The rows of one pass whose adapters one layer holds in the stack of rank class `cap`.

    `rows` are batch rows, sorted by their slot's position in that stack (`positions`), and
    sit at `start` … in `RowSlots.class_order`; the slot grid spans positions lo … hi-1 with
    `depth` cells per position, and row k of `rows` goes to cell `cells[k]` (k itself when
    `full`: no cell is empty)."""

    cap: int
    start: int
    rank: int  # the largest rank in use in this group
    rows: torch.Tensor
    positions: torch.Tensor
    lo: int
    hi: int
    depth: int
    cells: torch.Tensor
    distinct: int  # adapters in use
    rank_sum: int  # their ranks summed

    @property
    def full(self) -> bool:
        return len(self.rows) == (self.hi - self.lo) * self.depth


class RowSlots:
    """The slot of every row of the next forward pass (-1: base only), shared by every wrapped layer.

    `assign` precomputes once per pass what the kernels need: the rows that use an adapter,
    those rows sorted by slot, and the runs of equal slots in that order. `groups` adds, once per
    distinct stack layout (most layers share one), the rows grouped by rank class, and
    `class_order` those groups' rows one after another, so that a kernel gathers and scatters
    every class's rows with one call each."""

    def __init__(self, slots: Sequence[int] = (), device: torch.device | str = "cpu") -> None:
        self._scratch: dict[tuple, torch.Tensor] = {}
        self.assign(slots, device)

    def assign(self, slots: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.slots = [int(s) for s in slots]
        self.device = device
        self.used = frozenset(s for s in self.slots if s >= 0)
        order = sorted((i for i, s in enumerate(self.slots) if s >= 0), key=lambda i: self.slots[i])
        self.order = torch.tensor(order, dtype=torch.long, device=device)
        self.spans: list[tuple[int, int, int]] = []  # (slot, start, stop) over `order`
        for pos, i in enumerate(order):
            if self.spans and self.spans[-1][0] == self.slots[i]:
                self.spans[-1] = (self.slots[i], self.spans[-1][1], pos + 1)
            else:
                self.spans.append((self.slots[i], pos, pos + 1))
        self.span_sizes = [stop - start for _, start, stop in self.spans]
        self._groups: dict[tuple, tuple[list[RankGroup], torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def groups(self, factors: SlotFactors) -> list[RankGroup]:
        """The rows with an adapter in `factors`, grouped by the rank-class stack that holds it."""
        return self._grouped(factors)[0]

    def class_order(self, factors: SlotFactors) -> torch.Tensor:
        """The rows of `groups(factors)`, group after group."""
        return self._grouped(factors)[1]

    def _grouped(self, factors: SlotFactors) -> tuple[list[RankGroup], torch.Tensor]:
        found = self._groups.get(factors.layout)
        if found is None:
            groups = self._group(factors)
            order = torch.cat([g.rows for g in groups]) if groups else self.order[:0]
            found = self._groups[factors.layout] = (groups, order)
        return found

    def _group(self, factors: SlotFactors) -> list[RankGroup]:
        by_class: dict[int, list[tuple[int, int]]] = {}  # cap → [(position, row)]
        for row, slot in enumerate(self.slots):
            if slot >= 0 and factors.where[slot] is not None:
                cap, position = factors.where[slot]
                by_class.setdefault(cap, []).append((position, row))
        groups, start = [], 0
        for cap, members in sorted(by_class.items()):
            members.sort()
            positions = [p for p, _ in members]
            count = {p: positions.count(p) for p in positions}
            lo, hi, depth = positions[0], positions[-1] + 1, max(count.values())
            cells, seen = [], dict.fromkeys(count, 0)
            for p in positions:
                cells.append((p - lo) * depth + seen[p])
                seen[p] += 1
            owners = factors.classes[cap].owner
            ranks = [factors.ranks[owners[p]] for p in count]

            def tensor(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.long, device=self.device)

            groups.append(RankGroup(cap, start, max(ranks), tensor([r for _, r in members]), tensor(positions), lo,
                                    hi, depth, tensor(cells), len(count), sum(ranks)))
            start += len(members)
        return groups

    def scratch(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of `shape` for the kernels: layers run one after another, so one per key
        suffices, and reusing it spares the page faults of a fresh large allocation in every layer."""
        size = math.prod(shape)
        tag = (key, like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self._scratch.get(tag)
        if buf is None or buf.numel() < size:
            buf = self._scratch[tag] = like.new_empty(size)
        return buf[:size].view(shape)


class RankStack:
    """The slots of one layer whose adapters fall in one rank class: A as `a` [n, cap, in] and B as
    `bt` [n, cap, out] (Bᵀ, scale folded in), zero-padded to `cap`; `owner[p]` is the slot at
    position p (-1: free). It grows by a quarter when full; positions never move."""

    def __init__(self, cap: int, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.cap = cap
        self.a = torch.zeros(0, cap, in_features, dtype=dtype, device=device)
        self.bt = torch.zeros(0, cap, out_features, dtype=dtype, device=device)
        self.owner: list[int] = []

    def take(self, slot: int) -> int:
        """A free position for `slot` (the lowest, so the positions in use stay packed)."""
        position = next((p for p, o in enumerate(self.owner) if o < 0), None)
        if position is None:
            position, n = len(self.owner), len(self.owner) + max(1, len(self.owner) // 4)
            grown_a = self.a.new_zeros(n, *self.a.shape[1:])
            grown_bt = self.bt.new_zeros(n, *self.bt.shape[1:])
            grown_a[:position], grown_bt[:position] = self.a, self.bt
            self.a, self.bt = grown_a, grown_bt  # complete before it is seen: the engine may be reading
            self.owner += [-1] * (n - position)
        self.owner[position] = slot
        return position

    def free(self, position: int) -> None:
        self.a[position].zero_()
        self.bt[position].zero_()
        self.owner[position] = -1


class SlotFactors:
    """One layer's LoRA factors for every pool slot, in one `RankStack` per rank class.

    An adapter of rank r sits in the stack of capacity `rank_class(r)` (the next power of two),
    so a kernel that reads whole stacks reads at most twice the adapters' own numbers, and
    the memory held is within 2× of it, where one stack padded to the largest rank held 8×
    for a rank-8 adapter beside a rank-64 one (S-LoRA's unified paging answers the same
    problem with pages). `where[slot]` is (class, position) or None; `pairs[slot]` the views
    (Aᵀ, Bᵀ) cut to that slot's rank, kept ready so a kernel spends no calls slicing them; B is
    kept as Bᵀ because h @ Bᵀ with Bᵀ row-major runs 3–4× faster on CPU than through a
    transposed view of [out, r]."""

    def __init__(self, num_slots: int, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.shape, self.dtype, self.device = (in_features, out_features), dtype, device
        self.classes: dict[int, RankStack] = {}
        self.where: list[tuple[int, int] | None] = [None] * num_slots
        self.ranks = [0] * num_slots
        self._empty = (torch.zeros(in_features, 0, dtype=dtype, device=device),
                       torch.zeros(0, out_features, dtype=dtype, device=device))
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
        """Put A [r, in] and scale·B [out, r] into `slot`, in the stack of its rank class."""
        r, cap = a.shape[0], rank_class(a.shape[0])
        if self.where[slot] is not None and self.where[slot][0] != cap:
            self.clear(slot)
        if self.where[slot] is None:
            if cap not in self.classes:
                self.classes[cap] = RankStack(cap, *self.shape, self.dtype, self.device)
            self.where[slot] = (cap, self.classes[cap].take(slot))
        stack, position = self.classes[cap], self.where[slot][1]
        stack.a[position].zero_()
        stack.bt[position].zero_()
        stack.a[position, :r] = a
        stack.bt[position, :r] = b.T * scale
        self.ranks[slot] = r
        self._refresh()

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        if self.where[slot] is not None:
            cap, position = self.where[slot]
            self.classes[cap].free(position)
            if all(o < 0 for o in self.classes[cap].owner):
                del self.classes[cap]
        self.where[slot] = None
        self.ranks[slot] = 0
        self._refresh()

    def _refresh(self) -> None:
        self.pairs = [self._empty if w is None else
                      (self.classes[w[0]].a[w[1], :r].T, self.classes[w[0]].bt[w[1], :r])
                      for w, r in zip(self.where, self.ranks)]
        self.layout = tuple(self.where)

    def tensors(self) -> list[torch.Tensor]:
        """Every stacked tensor (A and Bᵀ of each rank class)."""
        return [t for stack in self.classes.values() for t in (stack.a, stack.bt)]

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _select_rows(x: torch.Tensor, index: torch.Tensor, rows: RowSlots, key: str = "x") -> torch.Tensor:
    """x's rows `index` as [rows, tokens, in] (in reused scratch memory)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.index_select(x, 0, index, out=rows.scratch(key, (len(index), *x.shape[1:]), x))


def _add_rows(out: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> None:
    out.view(out.shape[0], -1, out.shape[-1]).index_add_(0, index, delta)


def _class_rows(x: torch.Tensor, factors: SlotFactors,
                rows: RowSlots) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows.class_order, x's rows in that order, scratch for their deltas) for the per-class kernels."""
    order = rows.class_order(factors)
    xs = _select_rows(x, order, rows)
    return order, xs, rows.scratch("delta", (*xs.shape[:2], factors.shape[1]), xs)


def add_bgmv(out: torch.Tensor, x: torch.Tensor, factors: SlotFactors, rows: RowSlots) -> None:
    """out[i] += B[s_i] A[s_i] x[i] for every row with a slot, by gathering each row's factors
    (per rank class, cut to the largest rank in use there)."""
    order, x_all, delta = _class_rows(x, factors, rows)
    for g in rows.groups(factors):
        stack, n = factors.classes[g.cap], len(g.rows)
        xs = x_all[g.start : g.start + n]
        a = torch.index_select(stack.a[:, : g.rank], 0, g.positions,
                               out=rows.scratch("a", (n, g.rank, xs.shape[2]), xs))
        bt = torch.index_select(stack.bt[:, : g.rank], 0, g.positions,
                                out=rows.scratch("b", (n, g.rank, stack.bt.shape[2]), xs))
        torch.bmm(torch.bmm(xs, a.transpose(1, 2)), bt, out=delta[g.start : g.start + n])
    _add_rows(out, order, delta)


def add_sgmv(out: torch.Tensor, x: torch.Tensor, factors: SlotFactors, rows: RowSlots) -> None:
    """out[i] += B[s_i] A[s_i] x[i] with one pair of matmuls per run of rows sharing a slot."""
    xs = _select_rows(x, rows.order, rows)
    n, tokens = xs.shape[:2]
    delta = rows.scratch("delta", (n * tokens, factors.shape[1]), xs)
    sizes = [k * tokens for k in rows.span_sizes]
    for part, part_out, (slot, _, _) in zip(xs.view(n * tokens, -1).split(sizes), delta.split(sizes), rows.spans):
        at, bt = factors.pairs[slot]
        torch.mm(part @ at, bt, out=part_out)
    _add_rows(out, rows.order, delta.view(n, tokens, -1))


def add_slot_grid(out: torch.Tensor, x: torch.Tensor, factors: SlotFactors, rows: RowSlots) -> None:
    """out[i] += B[s_i] A[s_i] x[i] with two batched matmuls per rank class, straight over its stack.

    A class's rows are scattered into a grid of [positions in use' range, most rows on one
    position, tokens] (zeros elsewhere), so nothing of the factors is copied; the price is
    reading every position of the range at the class's largest rank in use, and computing the
    grid's empty cells."""
    order, x_all, delta = _class_rows(x, factors, rows)
    tokens, d_in, d_out = delta.shape[1], x_all.shape[2], delta.shape[2]
    for g in rows.groups(factors):
        stack, positions = factors.classes[g.cap], g.hi - g.lo
        xs, ds = x_all[g.start : g.start + len(g.rows)], delta[g.start : g.start + len(g.rows)]
        grid = xs
        if not g.full:
            grid = rows.scratch("grid", (positions * g.depth, tokens, d_in), xs).zero_()
            grid.index_copy_(0, g.cells, xs)
        h = torch.bmm(grid.view(positions, -1, d_in), stack.a[g.lo : g.hi, : g.rank].transpose(1, 2))
        cells = (ds.view(positions, -1, d_out) if g.full
                 else rows.scratch("grid delta", (positions, h.shape[1], d_out), xs))
        torch.bmm(h, stack.bt[g.lo : g.hi, : g.rank], out=cells)
        if not g.full:
            torch.index_select(cells.view(-1, tokens, d_out), 0, g.cells, out=ds)
    _add_rows(out, order, delta)


Kernel = Callable[[torch.Tensor, torch.Tensor, SlotFactors, RowSlots], None]
BGMV_MAX_RANK = 16
# Distinct adapters the grid needs per rank class when several classes are in use (its calls are
# per class): on ranks 8–64 (four classes) 2 a class took it 1.0–1.1× SGMV's time at decode, 4 a
# class 0.4–0.9×. With one class, 2 adapters already took it 0.7–0.98× SGMV's time.
GRID_MIN_PER_CLASS, GRID_MIN_ONE_CLASS = 4, 2
GRID_MAX_TOKENS = 16  # tokens per row: measured up to a 16-token prefill, where the grid still won
# What the grid uses over what it reads and computes (the ranks in use over each range's
# positions × its largest rank; the rows over the grid's cells), by intra-op threads: the grid's
# few large bmm calls spread over threads and SGMV's many small ones do not, so with one thread
# the grid pays for its padding only when it is small.
GRID_MIN_FILL_ONE_THREAD, GRID_MIN_FILL_THREADED = 0.75, 0.4
# On a GPU every kernel costs a launch, and SGMV launches per distinct adapter: on an H100 (bf16,
# SmolLM2 layer shapes, 8 or 64 rows, 1 or 16 tokens) the grid took 0.05–0.9× SGMV's time wherever
# each rank class in use held 2 or more distinct adapters, whatever its padding; below that SGMV won
# (BGMV never did by more than noise).
GRID_MIN_PER_CLASS_GPU = 2


def runs_on_gpu(rows: RowSlots) -> bool:
    return torch.device(rows.device).type == "cuda"


def choose_kernel(rows: RowSlots, factors: SlotFactors, tokens: int = 1) -> Kernel:
    """The slot grid when enough distinct adapters share each rank class in use and (on the CPU) the
    grid is mostly filled; else, on the CPU, BGMV when every row has an adapter of its own and the
    ranks in use are small; else SGMV."""
    groups = rows.groups(factors)
    if runs_on_gpu(rows):
        many = sum(g.distinct for g in groups) >= GRID_MIN_PER_CLASS_GPU * len(groups)
        return add_slot_grid if groups and many and tokens <= GRID_MAX_TOKENS else add_sgmv
    ranks_read, ranks_used = sum((g.hi - g.lo) * g.rank for g in groups), sum(g.rank_sum for g in groups)
    cells, cells_used = sum((g.hi - g.lo) * g.depth for g in groups), sum(len(g.rows) for g in groups)
    min_fill = GRID_MIN_FILL_ONE_THREAD if torch.get_num_threads() == 1 else GRID_MIN_FILL_THREADED
    enough = GRID_MIN_ONE_CLASS if len(groups) == 1 else GRID_MIN_PER_CLASS * len(groups)
    if (sum(g.distinct for g in groups) >= enough and tokens <= GRID_MAX_TOKENS
            and ranks_used >= min_fill * ranks_read and cells_used >= min_fill * cells):
        return add_slot_grid
    bgmv_fits = len(rows.spans) == len(rows.order) and max((g.rank for g in groups), default=0) <= BGMV_MAX_RANK
    return add_bgmv if bgmv_fits else add_sgmv


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
        return f"slots={len(self.factors.ranks)}, rank_classes={sorted(self.factors.classes)}"


def wrap_linear(model: nn.Module, path: str, rows: RowSlots, num_slots: int) -> BatchedLoRALinear:
    """The BatchedLoRALinear at `path`, putting one around the nn.Linear there if needed."""
    module = model.get_submodule(path)
    if isinstance(module, BatchedLoRALinear):
        return module
    wrapper = BatchedLoRALinear(module, rows, num_slots)
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, wrapper)
    return wrapper
