"""LoRA on bare parameters: nn.Parameters that no Linear holds, such as a mixture-of-experts block's
stacked expert weights (HF PEFT's `LoraConfig(target_parameters=...)`).

A targeted parameter is 2-D, one [out, in] weight, or 3-D, one [out, in] matrix per expert: [E, out, in],
or [E, in, out] where its module says `is_transposed = True` (as gpt-oss's experts do). Each expert e
gets its own rank-r update ΔW_e = s·B_e A_e (Hu et al., arXiv 2106.09685), held as PEFT holds them:
A [r·E, in] with expert e's rows at e·r … e·r + r − 1, and B [out, r·E] with expert e's columns at
e, E + e, 2E + e, … (the layout of `B.view(out, r, E)`).

The module holding the parameters is wrapped (`ParamAdapters`, the wrapper protocol of
loralab.layers); its forward runs the module's own forward with W + ΔW in place of each targeted
parameter (torch.func.functional_call), so whatever reads the parameter inside that forward — an
expert loop, a grouped matmul — computes with the adapted weight. As in PEFT, code that reads the
parameter from outside that forward sees the base weight, and the update is LoRA's (or rsLoRA's)
without dropout: a dropout on the input cannot be factored out of a weight read by unknown code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import torch
from torch import nn

from loralab.layers import Wrapper
from loralab.registry import close_matches
from loralab.spec import AdapterSpec
from loralab.targets import candidate_modules, set_module, suffix_match


class ParamLoRA(nn.Module):
    """One adapter's update of one parameter (see the module docstring)."""

    def __init__(self, param: torch.Tensor, r: int, scale: float, transposed: bool = False) -> None:
        super().__init__()
        self.stacked = param.dim() == 3
        self.experts = param.shape[0] if self.stacked else 1
        self.transposed = transposed and self.stacked
        out, inp = (param.shape[-1], param.shape[-2]) if self.transposed else (param.shape[-2], param.shape[-1])
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.empty(r * self.experts, inp, dtype=param.dtype, device=param.device))
        self.lora_B = nn.Parameter(torch.zeros(out, r * self.experts, dtype=param.dtype, device=param.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _per_expert(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_e [E, out, r], A_e [E, r, in])."""
        e = self.experts
        return self.lora_B.view(self.lora_B.shape[0], -1, e).permute(2, 0, 1), self.lora_A.view(e, -1,
                                                                                                self.lora_A.shape[1])

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW in the parameter's shape and dtype, the product and the sum in one kernel."""
        with torch.autocast(weight.device.type, enabled=False):
            if not self.stacked:
                return torch.addmm(weight, self.lora_B.to(weight.dtype), self.lora_A.to(weight.dtype), alpha=self.scale)
            b, a = (t.to(weight.dtype) for t in self._per_expert())
            if self.transposed:
                return torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=self.scale)
            return torch.baddbmm(weight, b, a, alpha=self.scale)

    def delta(self) -> torch.Tensor:
        """ΔW in the parameter's own shape."""
        if not self.stacked:
            return self.scale * (self.lora_B @ self.lora_A)
        b, a = self._per_expert()
        d = self.scale * torch.bmm(b, a)
        return d.transpose(1, 2) if self.transposed else d

    def extra_repr(self) -> str:
        return f"r={self.r}, experts={self.experts}, transposed={self.transposed}"


class ParamAdapters(Wrapper):
    """A module some of whose own parameters carry a LoRA update per adapter (see the module docstring). Its
    attributes read through the wrapper, its parameters as they are, without the updates (as in PEFT)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # adapter name → ModuleDict(parameter name → ParamLoRA)
        self._backups: dict[str, dict[str, torch.Tensor]] = {}
        self._live: list[nn.ModuleDict] = []

    @property
    def held(self) -> nn.ModuleDict:
        return self.adapters

    def add(self, name: str, updates: dict[str, ParamLoRA]) -> None:
        self.adapters[name] = nn.ModuleDict(updates)
        self._refresh()

    def _refresh(self) -> None:
        self._live = [self.adapters[n] for n in self.active if n not in self.merged]

    def weights(self) -> dict[str, torch.Tensor]:
        """Each updated parameter as the forward uses it: W plus the live adapters' ΔW."""
        out: dict[str, torch.Tensor] = {}
        for updates in self._live:
            for pname, update in updates.items():
                out[pname] = update.add_to(out[pname] if pname in out else getattr(self.base_layer, pname))
        return out

    def forward(self, *args, **kwargs):
        if self.row_plan is not None and not self.disabled and any(
                name in self.adapters for name, _ in self.row_plan.groups):
            raise RuntimeError("mixed-adapter batches are not supported through adapted parameters "
                               "(target_parameters change a weight for the whole batch); run one adapter at a time")
        if self.disabled or not self._live or self.row_plan is not None:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, self.weights(), args, kwargs)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        for pname, update in self.adapters[name].items():
            weight = getattr(self.base_layer, pname)
            if weight.element_size() < 4:  # 16-bit W + ΔW − ΔW is not W
                self._backups.setdefault(name, {})[pname] = weight.detach().clone()
            weight.copy_(update.add_to(weight.detach().float()).to(weight.dtype))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge_all(self) -> None:
        while self.merged:
            name = self.merged.pop()
            backups = self._backups.pop(name, {})
            for pname, update in self.adapters[name].items():
                weight = getattr(self.base_layer, pname)
                if pname in backups:
                    weight.copy_(backups[pname])
                else:
                    weight.sub_(update.delta().to(weight.dtype))
        self._refresh()


def plan_param_targets(model: nn.Module, keys: list[str], taken: Collection[str]) -> dict[str, list[str]]:
    """Module path → the names of its own parameters that `target_parameters` picks (PEFT's rule: the
    parameter's full name, or its ending after a dot), in the module's order. Checked before anything
    changes: each key matches, each parameter is 2-D or 3-D, and no module is also in `taken` (adapted
    as a layer or saved in full) or wrapped otherwise."""
    plan: dict[str, list[str]] = {}
    seen: list[str] = []
    used: set[str] = set()
    for path, module in candidate_modules(model):
        for pname, param in module.named_parameters(recurse=False):
            full = f"{path}.{pname}"
            seen.append(full)
            hits = [k for k in keys if suffix_match(full, k)]
            if not hits:
                continue
            used.update(hits)
            if param.dim() not in (2, 3):
                raise ValueError(f"target_parameters: {full} has shape {tuple(param.shape)}; LoRA goes on 2-D "
                                 "[out, in] weights and 3-D stacks of them (one per expert)")
            plan.setdefault(path, []).append(pname)
    for key in keys:
        if key not in used and any(suffix_match(n, key) for n, _ in model.named_parameters(recurse=False)):
            raise ValueError(f"target_parameters entry {key!r} names a parameter of the top-level module, which "
                             "has no parent to wrap it (as in PEFT): put it in a sub-module")
        if key not in used:
            hint = close_matches(key, {".".join(n.rsplit(".", 2)[-2:]) for n in seen} | {n.rsplit(".", 1)[-1]
                                                                                        for n in seen})
            raise ValueError(f"target_parameters entry {key!r} matches no parameter of the model"
                             + (f"; close matches: {', '.join(hint)}" if hint else ""))
    for path in plan:
        current = model.get_submodule(path)
        if path in taken or (isinstance(current, Wrapper) and not isinstance(current, ParamAdapters)):
            raise ValueError(f"target_parameters: {path} is also adapted as a layer or saved in full, by this "
                             "adapter or another; target its parameters or the module, not both")
        inner = [n for n, m in getattr(current, "unwrapped", current).named_modules()
                 if n and next(m.parameters(recurse=False), None) is not None]
        if inner:
            raise ValueError(f"target_parameters: {path} holds sub-modules with parameters ({', '.join(inner[:3])}); "
                             "loralab adapts the parameters of modules without any (as expert blocks are)")
    return plan


def attach_param_targets(model: nn.Module, name: str, plan: dict[str, list[str]],
                         spec_for: Callable[[str], AdapterSpec]) -> None:
    """Give adapter `name` an update of each planned parameter, wrapping each module once; `spec_for(key)`
    gives a parameter's spec (its rank and scale, rank_pattern and alpha_pattern applied) from its full name."""
    for path, pnames in plan.items():
        current = model.get_submodule(path)
        if not isinstance(current, ParamAdapters):
            current = ParamAdapters(current)
            set_module(model, path, current)
        base = current.base_layer
        transposed = bool(getattr(base, "is_transposed", False))
        specs = {p: spec_for(f"{path}.{p}") for p in pnames}
        current.add(name, {p: ParamLoRA(getattr(base, p), s.r, s.scale, transposed=transposed)
                           for p, s in specs.items()})


def peft_tensors(path: str, module: ParamAdapters, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s factors on the module at `path` under PEFT's keys (without its `base_model.model.`).
    PEFT nests one wrapper per parameter, the first in the module's order innermost, so with k parameters
    the j-th one's factors sit under k − 1 − j `base_layer`s."""
    updates = module.adapters[name]
    order = [p for p, _ in module.base_layer.named_parameters(recurse=False) if p in updates]
    out: dict[str, torch.Tensor] = {}
    for j, pname in enumerate(order):
        where = path + ".base_layer" * (len(order) - 1 - j)
        out[f"{where}.lora_A.weight"] = updates[pname].lora_A
        out[f"{where}.lora_B.weight"] = updates[pname].lora_B
    return out
