"""A registry of many LoRA adapters on disk, a few of them resident in the model's stacked slots.

As in S-LoRA (Sheng et al., arXiv 2311.03285): thousands of adapters are registered (only
their `adapter_config.json` is read), at most `max_loaded` are resident at once, and a
request's adapter is loaded into a free slot, or into the least recently used slot nobody
holds, when its turn comes. `prefetch` loads the adapters of queued requests ahead of
time; `pin` keeps an adapter resident. Adapters in use by running requests (`acquire` …
`release`) and pinned ones are never evicted.

Loading reads the PEFT-format folder, checks every tensor against the base layer's shape
and only then touches a slot, so a bad file leaves the pool as it was. Folders must lie
inside the pool's root. The batched path serves plain LoRA on `nn.Linear` layers (PEFT
`peft_type: LORA`, rsLoRA and per-layer ranks and scales included: each layer's factors
go into the stack of their own rank class); DoRA, biases, `modules_to_save`, trainable token rows,
LoRA on parameters and embedding LoRA are refused at registration with the reason
(`unstackable`) — attach those to the model instead
(`serve/attached.py`), and the engine serves them through the core per-row path. The pool
puts its slots inside such attached layers, so both kinds share every batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loralab.checkpoint import CONFIG_FILE, read_config, read_tensors, spec_from_config
from loralab.layers import AdaptedLayer
from loralab.methods.base import check_shape
from loralab.model import adapter_names
from loralab.peft_lora_fields import changes_base
from loralab.registry import close_matches
from loralab.serve.batched_lora import BatchedLoRALinear, RowSlots, wrap_linear
from loralab.spec import AdapterSpec

FACTOR_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B"}


BASE_CHANGING = ("PEFT's init_lora_weights set to an init that changes the base weights, which every served adapter "
                 "shares (load it and save it with loralab.save_adapter: that writes it as a LoRA on the original "
                 "base, which the pool can hold)")


WHOLE_BATCH = ("target_parameters (LoRA on parameters, e.g. MoE experts), which changes a weight for a whole batch, "
               "not row by row (merge it into the base: loralab merge)")


REPLICATED = ("layer_replication (replicated blocks), which changes the base model's depth for every row that "
              "shares it")


ACTIVATED = ("alora_invocation_tokens (activated LoRA), whose rows start at their invocation tokens, found in "
             "each request's prompt")


def unstackable(config: dict, spec: AdapterSpec) -> list[str]:
    """Why the pool's stacked LoRA slots cannot hold this adapter (empty: they can)."""
    return [why for bad, why in (
        (spec.method != "lora", f"method {spec.method!r} (the slots hold plain LoRA)"),
        (spec.bias != "none", f"bias={spec.bias!r} (trained biases)"),
        (bool(spec.modules_to_save), f"modules_to_save={spec.modules_to_save}"),
        (spec.trainable_token_indices is not None, "trainable_token_indices (trained token rows)"),
        (spec.target_parameters is not None, WHOLE_BATCH),
        (spec.layer_replication is not None, REPLICATED),
        (spec.options.get("alora_invocation_tokens") is not None, ACTIVATED),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D layers)"),
        (bool(config.get("lora_bias")), "lora_bias"),
        (changes_base(config), BASE_CHANGING),
    ) if bad]


class AdapterNotFound(LookupError):
    """No adapter of that name is registered."""


class AdapterLoadError(ValueError):
    """The adapter's files cannot be served on this base model (the pool is left unchanged)."""


class PoolBusy(RuntimeError):
    """Every slot holds an adapter in use by a running request: retry once one finishes."""


class PoolPinned(RuntimeError):
    """Every slot holds a pinned adapter, so nothing else can be loaded until one is unpinned."""


@dataclass(eq=False)
class _Entry:
    name: str
    folder: Path
    spec: AdapterSpec  # each layer's rank and scale: spec.for_layer(path)
    slot: int | None = None
    users: int = 0
    pinned: bool = False
    nbytes: int = 0


@dataclass(frozen=True)
class Lease:
    """A resident adapter held by one request; hand it back with `AdapterPool.release`."""

    name: str
    slot: int
    entry: _Entry = field(repr=False)


@dataclass(frozen=True)
class PoolStats:
    registered: int
    loaded: int
    pinned: int
    hits: int
    misses: int
    evictions: int
    prefetched: int
    load_errors: int
    bytes_resident: int  # the resident adapters' own factors
    bytes_allocated: int  # the stacked slots: per layer, one stack per rank class (the next power of two)


class AdapterPool:
    """Adapters under `root_dir`, at most `max_loaded` resident in `model`'s stacked LoRA slots.

    With `discover` (the default) every folder under the root holding an adapter_config.json
    is registered under its path relative to the root ("org/name"); folders the batched path
    cannot serve are listed in `rejected` with the reason. Thread-safe.
    """

    def __init__(self, root_dir: str | Path, max_loaded: int, *, model: nn.Module, discover: bool = True) -> None:
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
            raise ValueError(f"max_loaded must be a positive integer, got {max_loaded!r}")
        self.root = Path(root_dir).resolve()
        if not self.root.is_dir():
            raise ValueError(f"adapter root {root_dir} is not a directory")
        wrapped = [p for p, m in model.named_modules() if isinstance(m, BatchedLoRALinear)]
        if wrapped:
            raise ValueError(f"the model already carries another pool's slots ({wrapped[0]}, …): "
                             "give each pool its own base model")
        self.model = model
        self.max_loaded = max_loaded
        self.rows = RowSlots()
        self.rejected: dict[str, str] = {}
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._slots: list[_Entry | None] = [None] * max_loaded
        self._slot_layers: list[set[str]] = [set() for _ in range(max_loaded)]
        self._lru: OrderedDict[_Entry, None] = OrderedDict()  # resident entries, least recently used first
        self._counts = dict.fromkeys(("hits", "misses", "evictions", "prefetched", "load_errors"), 0)
        if discover:
            self.discover()

    # ---- registry ----------------------------------------------------------------------------
    def discover(self) -> list[str]:
        """Register every adapter folder under the root not registered yet; returns the new names."""
        added = []
        for config in sorted(self.root.rglob(CONFIG_FILE)):
            name = config.parent.relative_to(self.root).as_posix()
            if name in self._entries or name == "." or name in adapter_names(self.model):
                continue
            try:
                self.register(name, config.parent)
            except (ValueError, FileNotFoundError) as err:
                self.rejected[name] = str(err)
                continue
            added.append(name)
        return added

    def register(self, name: str, folder: str | Path | None = None) -> None:
        """Register adapter `name` (folder: root/name by default); reads only its config."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        path = Path(folder) if folder is not None else self.root / name
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise ValueError(f"adapter folder {path} lies outside the pool's root {self.root}; "
                             "only folders under the root are served")
        config = read_config(resolved)
        try:
            spec = spec_from_config(config)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{resolved / CONFIG_FILE} is not a valid adapter config: {err}") from None
        reasons = unstackable(config, spec)
        if reasons:
            raise ValueError(f"adapter {name!r} cannot be held in the pool's slots: it uses {'; '.join(reasons)} "
                             "(attach it to the model instead: see loralab.serve.attached)")
        if name in adapter_names(self.model):
            raise ValueError(f"an adapter named {name!r} is attached to the model; choose another name")
        with self._lock:
            if name in self._entries:
                raise ValueError(f"an adapter named {name!r} is already registered; remove it first")
            self._entries[name] = _Entry(name, resolved, spec)
            self.rejected.pop(name, None)

    def verify(self, name: str) -> None:
        """Read and check `name`'s files against the base model without loading it; raises
        AdapterLoadError saying what does not fit (a corrupt file, a tensor of the wrong shape)."""
        with self._lock:
            entry = self._entry(name)
        self._read(entry)

    def remove(self, name: str) -> None:
        """Unregister `name`; its slot is freed now, or when the last request using it finishes."""
        with self._lock:
            entry = self._entry(name)
            del self._entries[name]
            entry.pinned = False
            if entry.users == 0:
                self._unload(entry)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            hint = close_matches(str(name), self._entries)
            raise AdapterNotFound(f"unknown adapter {name!r}" + (f"; did you mean: {', '.join(hint)}?" if hint else "")
                                  + f" ({len(self._entries)} adapters are registered under {self.root})")
        return entry

    # ---- residency ---------------------------------------------------------------------------
    def acquire(self, name: str) -> Lease:
        """Make `name` resident (loading it on a miss) and hold it for one request.

        Files are read outside the lock, so a load in one thread does not stall hits in another."""
        with self._lock:
            entry = self._entry(name)
            if entry.slot is not None:
                self._counts["hits"] += 1
                return self._hold(entry)
            self._check_room(entry)
        factors = self._read(entry)
        with self._lock:
            if entry.slot is None:
                self._place(entry, factors)
                self._counts["misses"] += 1
            else:  # another thread loaded it meanwhile
                self._counts["hits"] += 1
            return self._hold(entry)

    def _hold(self, entry: _Entry) -> Lease:
        entry.users += 1
        self._lru.move_to_end(entry)
        return Lease(entry.name, entry.slot, entry)

    def release(self, lease: Lease) -> None:
        with self._lock:
            entry = lease.entry
            entry.users -= 1
            if entry.users == 0 and self._entries.get(entry.name) is not entry:  # removed while in use
                self._unload(entry)

    def pin(self, name: str) -> None:
        """Load `name` if needed and keep it resident until `unpin`."""
        with self._lock:
            entry = self._entry(name)
            if entry.slot is None:
                self._check_room(entry)
                self._place(entry, self._read(entry))
            entry.pinned = True

    def unpin(self, name: str) -> None:
        with self._lock:
            self._entry(name).pinned = False

    def prefetch(self, names: Iterable[str]) -> list[str]:
        """Load the given adapters ahead of their requests while a slot can be had without
        evicting another of them; unknown, unloadable or unplaceable ones are skipped (their
        requests report the error when admitted). Returns the names loaded."""
        with self._lock:
            wanted = [self._entries[n] for n in dict.fromkeys(names) if n in self._entries]
        loaded: list[str] = []
        for entry in wanted:
            with self._lock:
                if entry.slot is not None:
                    continue
                if self._free_slot() is None and self._victim(keep=wanted) is None:
                    break
            try:
                factors = self._read(entry)
            except AdapterLoadError:
                continue
            with self._lock:
                if entry.slot is not None or self._entries.get(entry.name) is not entry:
                    continue
                try:
                    self._place(entry, factors, keep=wanted)
                except (PoolBusy, PoolPinned):  # slots taken while the file was read
                    break
                self._counts["prefetched"] += 1
                loaded.append(entry.name)
        return loaded

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return [e.name for e in self._lru]

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            return self._entry(name).slot

    def stats(self) -> PoolStats:
        with self._lock:
            allocated = sum(m.factors.allocated_bytes() for m in self.model.modules()
                            if isinstance(m, BatchedLoRALinear))
            return PoolStats(registered=len(self._entries), loaded=len(self._lru),
                             pinned=sum(e.pinned for e in self._lru), **self._counts,
                             bytes_resident=sum(e.nbytes for e in self._lru), bytes_allocated=allocated)

    # ---- loading -----------------------------------------------------------------------------
    def _free_slot(self) -> int | None:
        return next((i for i, e in enumerate(self._slots) if e is None), None)

    def _victim(self, keep: Collection[_Entry] = ()) -> _Entry | None:
        return next((e for e in self._lru if e.users == 0 and not e.pinned and e not in keep), None)

    def _check_room(self, entry: _Entry, keep: Collection[_Entry] = ()) -> None:
        if self._free_slot() is not None or self._victim(keep) is not None:
            return
        if all(e.pinned for e in self._lru):
            raise PoolPinned(f"all {self.max_loaded} adapter slots hold pinned adapters; "
                             f"unpin one or raise max_loaded to serve {entry.name!r}")
        raise PoolBusy(f"all {self.max_loaded} adapter slots are in use by running requests")

    def _place(self, entry: _Entry, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
               keep: Collection[_Entry] = ()) -> None:
        """Write checked factors into a free slot, or the least recently used one nobody holds."""
        self._check_room(entry, keep)
        slot = self._free_slot()
        if slot is None:
            victim = self._victim(keep)
            slot = victim.slot
            self._unload(victim)
            self._counts["evictions"] += 1
        for path, (a, b, scale) in factors.items():
            wrap_linear(self.model, path, self.rows, self.max_loaded).factors.write(slot, a, b, scale)
        for path in self._slot_layers[slot] - set(factors):
            self.model.get_submodule(path).factors.clear(slot)
        self._slot_layers[slot] = set(factors)
        self._slots[slot] = entry
        entry.slot = slot
        entry.nbytes = sum((a.numel() + b.numel()) * a.element_size() for a, b, _ in factors.values())
        self._lru[entry] = None

    def _unload(self, entry: _Entry) -> None:
        if entry.slot is None:
            return
        for path in self._slot_layers[entry.slot]:
            self.model.get_submodule(path).factors.clear(entry.slot)
        self._slot_layers[entry.slot] = set()
        self._slots[entry.slot] = None
        entry.slot = None
        entry.nbytes = 0
        self._lru.pop(entry, None)

    def _read(self, entry: _Entry) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{layer path: (A [r, in], B [out, r], scale)}, A and B in the base weight's dtype, every shape
        checked against the layer's own rank."""
        try:
            return self._read_checked(entry)
        except AdapterLoadError:
            with self._lock:
                self._counts["load_errors"] += 1
            raise

    def _read_checked(self, entry: _Entry) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        try:
            if not entry.folder.resolve().is_relative_to(self.root):  # replaced by a link since registration
                raise ValueError(f"the folder now lies outside the pool's root {self.root}")
            tensors = read_tensors(entry.folder)
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for key, t in tensors.items():
                path, _, leaf = key.partition(".lora_")
                factor = FACTOR_KEYS.get("lora_" + leaf)
                if factor is None:
                    raise ValueError(f"tensor {key} is not a LoRA factor of a linear layer "
                                     "(the mixed-batch path serves lora_A.weight / lora_B.weight only)")
                groups.setdefault(path, {})[factor] = t
            return {self._slot_path(path): self._checked(path, group, entry.spec.for_layer(path))
                    for path, group in groups.items()}
        except (ValueError, FileNotFoundError) as err:
            raise AdapterLoadError(f"adapter {entry.name!r} ({entry.folder}) cannot be loaded: {err}") from None

    def _slot_path(self, path: str) -> str:
        """Where the slots of layer `path` go: inside an attached adapter's layer, around its base."""
        return f"{path}.base_layer" if isinstance(self.model.get_submodule(path), AdaptedLayer) else path

    def _checked(self, path: str, group: dict[str, torch.Tensor],
                 spec: AdapterSpec) -> tuple[torch.Tensor, torch.Tensor, float]:
        if set(group) != {"A", "B"}:
            missing = "lora_A.weight" if "A" not in group else "lora_B.weight"
            raise ValueError(f"the file has no {path}.{missing}")
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the file has factors for {path}, which the base model does not have") from None
        while isinstance(module, AdaptedLayer | BatchedLoRALinear):
            module = module.base_layer
        base = module
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{path} is a {type(base).__name__}; the mixed-batch path adapts nn.Linear layers only")
        check_shape(f"{path}.lora_A.weight", group["A"].shape, (spec.r, base.in_features))
        check_shape(f"{path}.lora_B.weight", group["B"].shape, (base.out_features, spec.r))
        w = base.weight
        return group["A"].to(w.device, w.dtype), group["B"].to(w.device, w.dtype), spec.scale
