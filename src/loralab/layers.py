"""The wrappers loralab puts into a model.

`AdaptedLayer` wraps one base layer and holds named adapter methods; its output is the base
output plus the change of every active adapter. `SavedModule` wraps a module trained in
full for an adapter (PEFT's `modules_to_save`, e.g. a classifier head); loralab.token_rows'
`TokenRows` wraps an embedding whose rows at some tokens are trained. Each can take a
`RowPlan` — which rows of the batch use which adapter — so one forward pass may mix
adapters; the serving engine and the mixture routers use that same path.

All three are a `Wrapper`, whose protocol loralab.model relies on: `held` (the per-adapter modules by
name), `unwrapped` (the module they wrap), `plain(active)` (what is left once the adapters are merged
and the wrapper unloaded), and add/remove/set_active, `disabled`, `row_plan`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from loralab.fused_lora import LowRankTerms, lora_linear
from loralab.layer_kinds import LayerKind, kind_of
from loralab.methods.base import AdapterMethod
from loralab.siblings import SiblingGroup


def _own_and_nested_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers with its submodules': what parameters() and buffers() give, read
    straight from the modules' dicts (this runs on every grouped call, where those generators cost)."""
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None:
            tensors += _own_and_nested_tensors(child)
    return tensors


@dataclass
class RowPlan:
    """Rows of a batch grouped by adapter; name None means the base model alone."""

    groups: list[tuple[str | None, torch.Tensor]]

    @classmethod
    def from_names(cls, names: list[str | None], device: torch.device | None = None) -> RowPlan:
        rows: dict[str | None, list[int]] = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)
        return cls([(n, torch.tensor(r, dtype=torch.long, device=device)) for n, r in rows.items()])

    def on(self, device: torch.device) -> RowPlan:
        if all(idx.device == device for _, idx in self.groups):
            return self
        return RowPlan([(n, idx.to(device)) for n, idx in self.groups])


class Wrapper(nn.Module):
    """What every wrapper shares (the protocol in the module docstring): per-adapter modules in `held`, the
    active ones, the merged ones, the disabled switch and the row plan."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.row_plan: RowPlan | None = None

    @property
    def held(self) -> nn.ModuleDict:
        raise NotImplementedError

    @property
    def unwrapped(self) -> nn.Module:
        return self.base_layer

    def plain(self, active: list[str]) -> nn.Module:
        """What stays once the adapters are merged and the wrapper is unloaded: the wrapped module, whose weights
        hold what was merged."""
        return self.base_layer

    def __getattr__(self, name: str):
        """What the wrapped `base_layer` has, for code that reads a layer's attributes (in_features,
        num_experts, an attention's batch_first, …)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base_layer") if "_modules" in self.__dict__ else None
            if base is None or name.startswith("__"):
                raise
            return self._base_attribute(base, name)

    def _base_attribute(self, base: nn.Module, name: str):
        return getattr(base, name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.held)}, active={self.active}, merged={self.merged}"

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before removing it")
        del self.held[name]
        self.active = [n for n in self.active if n != name]
        self._refresh()

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.held]
        self._refresh()

    def _refresh(self) -> None:
        """Recompute what follows from the held, active and merged adapters."""


class AdaptedLayer(Wrapper):
    """A base layer plus named adapters (see module docstring)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        kind = kind_of(base_layer)
        if kind is None:
            raise TypeError(f"cannot adapt {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind: LayerKind = kind
        self.adapters = nn.ModuleDict()
        self._backups: dict[str, torch.Tensor] = {}
        self._bias_backups: dict[str, torch.Tensor] = {}  # of adapters whose merge changes the bias
        self._live: list[AdapterMethod] = []
        self._needs_base = False
        self.siblings: SiblingGroup | None = None  # set by loralab.siblings.link_siblings

    @property
    def held(self) -> nn.ModuleDict:
        return self.adapters

    def _base_attribute(self, base: nn.Module, name: str):
        """An attention's packed input projection as it computes with it (see `weight`)."""
        if self.kind.name == "mha" and name in ("in_proj_weight", "in_proj_bias"):
            return self.weight if name == "in_proj_weight" else self.bias
        return getattr(base, name)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, for code that reads a layer's weight instead of calling it
        (nn.MultiheadAttention reads its out_proj's): the base weight with the live adapters folded in,
        differentiably, so they train through it (an input dropout does not apply there)."""
        weight = self.kind.weight
        if self._rows_use_adapters():
            raise RuntimeError("this layer's weight was read directly (not through its forward) in a mixed-adapter "
                               "batch, where each row has its own weight; run one adapter at a time")
        if self.disabled or not self._live or self.row_plan is not None:
            return weight
        matrix = self.kind.matrix(weight)
        for method in self._live:
            matrix = method.merged_weight(matrix)
        return self.kind.to_weight(matrix)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias this layer computes with (see `weight`)."""
        bias = self.kind.bias
        if bias is None or self.disabled or self.row_plan is not None:
            return bias
        for method in self._live:
            changed = method.merged_bias(bias)
            bias = bias if changed is None else changed
        return bias

    def add(self, name: str, method: AdapterMethod) -> None:
        self.adapters[name] = method
        self._refresh()

    def _refresh(self) -> None:
        self._live = [self.adapters[n] for n in self.active if n not in self.merged]
        self._needs_base = any(m.needs_base for m in self._live)
        if self.siblings is not None:
            self.siblings.clear()

    @property
    def _alone(self) -> bool:
        """One live adapter on every row: the case a fused step may compute."""
        return len(self._live) == 1 and not self.disabled and self.row_plan is None

    def state_tensors(self) -> list[torch.Tensor]:
        """What the output depends on besides the input: the base layer's and the live adapters'
        parameters and buffers (their version counters tell whether any changed in place)."""
        return [t for m in (self.base_layer, *self._live) for t in _own_and_nested_tensors(m)]

    def fused_terms(self, x: torch.Tensor) -> LowRankTerms | None:
        """This layer as one fused step computes it (see AdapterMethod.fused_terms), or None."""
        return self._live[0].fused_terms(x) if self._alone else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        alone = self._alone
        if alone and not args and not kwargs:  # (an attention takes key and value too: never fused)
            if self.siblings is not None and torch.is_grad_enabled():  # (siblings group only then)
                out = self.siblings.output(self, x)
                if out is not None:
                    return out
            terms = self._live[0].fused_terms(x)
            if terms is not None:
                return lora_linear(x, terms)
        if self.kind.name == "mha":
            return self._forward_attention(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_plan is not None:
            changed = self._forward_rows(x, out, self.row_plan)
        elif not self._live:
            return out
        elif alone:
            changed = self._live[0].apply_alone(x, out)
        else:
            base = self.kind.without_bias(out) if self._needs_base else None
            changed = out
            for method in self._live:
                changed = method.add_to(changed, x, base)
        # the base layer's dtype, also where an adapter's float32 tensors meet autocast's 16-bit products
        return changed if changed.dtype == out.dtype else changed.to(out.dtype)

    def _forward_attention(self, *args, **kwargs):
        """nn.MultiheadAttention run with its adapted input projection (see layer_kinds.AttentionKind)."""
        if self._rows_use_adapters():
            raise RuntimeError("mixed-adapter batches are not supported through nn.MultiheadAttention (its "
                               "adapters change its weights, one set per call); run one adapter at a time")
        if self.disabled or not self._live or self.row_plan is not None:
            return self.base_layer(*args, **kwargs)
        return self.kind.call_with(self.weight, self.bias, args, kwargs)

    def _rows_use_adapters(self) -> bool:
        """Whether a mixed-adapter batch is running with rows that use this layer's adapters."""
        return self.row_plan is not None and not self.disabled and any(
            name in self.adapters for name, _ in self.row_plan.groups)

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        if self.merged:
            raise RuntimeError(f"adapters {self.merged} are merged: unmerge them before a mixed-adapter batch")
        plan = plan.on(out.device)
        result = out
        for name, idx in plan.groups:
            method = self.adapters[name] if name is not None and name in self.adapters else None
            if method is None:
                continue
            method.batch_rows = idx  # (for methods whose change depends on the row: activated LoRA)
            try:
                rows = method.apply_alone(x.index_select(0, idx), out.index_select(0, idx))
            finally:
                method.batch_rows = None
            result = result.index_copy(0, idx, rows)
        return result

    # ---- merging ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        method = self.adapters[name]
        weight = self.kind.weight
        if not method.additive or weight.element_size() < 4:  # 16-bit W + ΔW − ΔW is not W
            self._backups[name] = weight.detach().clone()
        # in float32 at least: a non-additive method (DoRA's norms, OFT's rotation) works at full precision
        # on a 16-bit W, and the result is rounded once, into W
        wide = torch.promote_types(weight.dtype, torch.float32)
        merged = method.merged_weight(self.kind.matrix(weight.detach()).to(wide, copy=True))
        bias = self.kind.bias
        new_bias = None if bias is None else method.merged_bias(bias.detach())
        if new_bias is not None:
            self._bias_backups[name] = bias.detach().clone()
            bias.copy_(new_bias)
        weight.copy_(self.kind.to_weight(merged))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge_all(self) -> None:
        weight = self.kind.weight
        while self.merged:
            name = self.merged.pop()
            if name in self._bias_backups:
                self.kind.bias.copy_(self._bias_backups.pop(name))
            if name in self._backups:
                weight.copy_(self._backups.pop(name))
            else:
                delta = self.adapters[name].delta_weight()
                weight.sub_(self.kind.to_weight(delta.to(weight.dtype)))
        self._refresh()

class SavedModule(Wrapper):
    """A module trained in full per adapter: the original stays, each adapter has a copy."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()

    @property
    def held(self) -> nn.ModuleDict:
        return self.copies

    @property
    def unwrapped(self) -> nn.Module:
        return self.original

    def plain(self, active: list[str]) -> nn.Module:
        """The first active adapter's copy, else the original."""
        return self.copies[active[0]] if active and active[0] in self.copies else self.original

    def add(self, name: str) -> nn.Module:
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original(x, *args, **kwargs)
        if self.row_plan is not None:
            out = self.original(x, *args, **kwargs)
            for name, idx in self.row_plan.on(x.device).groups:
                if name in self.copies:
                    out = out.index_copy(0, idx, self.copies[name](x.index_select(0, idx), *args, **kwargs))
            return out
        module = self.copies[self.active[0]] if self.active else self.original
        return module(x, *args, **kwargs)
