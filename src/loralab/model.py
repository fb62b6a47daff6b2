"""Adapters on any nn.Module: add, activate, disable, merge, mix per row, remove.

State lives on the model itself (`model._loralab`), so these are plain functions over a
plain model — no wrapper class, and the model's own `forward`/`generate` keep working.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loralab import activated_lora
from loralab.inits.base import INITS, InitContext, undo_start
from loralab.layer_kinds import kind_of
from loralab.layer_replication import Replication, refuse_merge, release, replicated_for
from loralab.layers import AdaptedLayer, RowPlan, SavedModule, Wrapper
from loralab.methods.base import METHODS, AdapterMethod
from loralab.param_targets import ParamAdapters, attach_param_targets, plan_param_targets
from loralab.progress import over_layers
from loralab.registry import close_matches, unknown_name_message
from loralab.siblings import link_siblings
from loralab.spec import AdapterSpec, pattern_value
from loralab.targets import candidate_modules, resolve_targets, set_module, suffix_match
from loralab.token_rows import TokenRows, attach_token_rows, plan_token_rows


@dataclass
class LoralabState:
    specs: dict[str, AdapterSpec] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    hook_handles: list[Any] = field(default_factory=list)
    replication: Replication | None = None  # the model's replicated blocks (loralab.layer_replication)
    adapter_hooks: dict[str, list[Any]] = field(default_factory=dict)  # an adapter's own hooks on the model


def state_of(model: nn.Module) -> LoralabState:
    state = getattr(model, "_loralab", None)
    if state is None:
        state = LoralabState()
        model._loralab = state
        state.hook_handles.append(model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True))
    return state


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters attached to `model`, in the order they were added."""
    return list(state_of(model).specs)


def get_spec(model: nn.Module, name: str) -> AdapterSpec:
    return state_of(model).specs[_known(model, name)]


def _known(model: nn.Module, name: str) -> str:
    specs = state_of(model).specs
    if name not in specs:
        raise ValueError(unknown_name_message("adapter", name, specs))
    return name


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """(path, wrapper) for everything loralab put into the model (layers.Wrapper's protocol)."""
    for path, module in model.named_modules():
        if isinstance(module, Wrapper):
            yield path, module


def adapted_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, AdaptedLayer]]:
    """(path, layer) for every adapted layer (holding adapter `name`, if given)."""
    for path, module in wrappers(model):
        if isinstance(module, AdaptedLayer) and (name is None or name in module.adapters):
            yield path, module


def _check_patterns(method_cls: type[AdapterMethod], spec: AdapterSpec, layer_specs: dict[str, AdapterSpec]) -> None:
    """A rank_pattern / alpha_pattern key naming no adapted module is a warning (PEFT ignores it; a file
    may hold one); per-layer ranks need layers that share nothing sized by r."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(spec, field_name):
            if not any(pattern_value({key: True}, path, False) for path in layer_specs):
                close = close_matches(key, list(layer_specs))
                warnings.warn(f"{field_name} key {key!r} matches none of the adapted modules"
                              + (f" (close: {', '.join(close)})" if close else ""), stacklevel=3)
    shares = method_cls.make_shared.__func__ is not AdapterMethod.make_shared.__func__
    if shares and any(s.r != spec.r for s in layer_specs.values()):
        raise ValueError(f"method {spec.method!r} shares parameters across layers sized by one r: rank_pattern "
                         "cannot give its layers ranks of their own (alpha_pattern can scale them)")


def add_adapter(
    model: nn.Module,
    spec: AdapterSpec | None = None,
    name: str = "default",
    calibration: Iterable[Any] | None = None,
    calibration_batches: int = 8,
    activate: bool = True,
    loss_fn: Any = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Attach a new adapter in place and return the model; the base weights are frozen.

    With `activate` (the default) the new adapter becomes the active one and trains.
    `dtype`: the adapter's tensors (its layers' and its modules_to_save copies) in this dtype
    (default: the base weights'), e.g. float32 over a bfloat16 base so that optimiser updates are
    not rounded away; the products then run under autocast (`TrainConfig(precision="bf16")`).

    `calibration` (batches of model inputs, dicts) feeds data-driven initialisers such as LoRA-GA or EVA;
    `loss_fn(model, batch)` gives LoRA-GA its loss (default: `model(**batch).loss`).

    An add that fails (a calibration batch the model refuses, Ctrl-C in an initialiser) leaves the model as it
    was: no part of the adapter stays, and base weights an initialiser moved a share of into the adapter
    (PiSSA and its kin) get it back, to float rounding. LoftQ's quantised base is the exception: it is not
    kept, so a LoftQ init stopped midway leaves the layers it reached quantised.
    """
    spec = spec or AdapterSpec()
    state = state_of(model)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in state.specs:
        raise ValueError(f"an adapter named {name!r} already exists; remove it first or choose another name")
    method_cls = METHODS.get(spec.method)
    init = INITS.get(spec.init)
    with replicated_for(model, spec.layer_replication, state):
        plan = _plan(model, spec, method_cls)
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        _attach(model, name, spec, plan, init, InitContext(calibration, calibration_batches, loss_fn,
                                                           spec.init_options), dtype)
        set_active(model, name if activate else state.active)
    except BaseException:  # a failed initialiser or Ctrl-C in its calibration: the model as it was
        new_methods = plan[0]
        for _, method in new_methods:
            undo_start(method)
        _detach(model, name)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise
    return model


def _attach(model: nn.Module, name: str, spec: AdapterSpec, plan: tuple, init: Any, context: InitContext,
            dtype: torch.dtype | None) -> None:
    """Put what `_plan` built into the model and initialise it."""
    state = state_of(model)
    new, _, _, saved_paths, token_plan, param_plan = plan
    for path in saved_paths:
        current = model.get_submodule(path)
        if not isinstance(current, SavedModule):
            current = SavedModule(current)
            set_module(model, path, current)
        current.add(name)

    for p in model.parameters():
        p.requires_grad_(False)
    for path, method in new:
        current = model.get_submodule(path)
        if not isinstance(current, AdaptedLayer):
            current = AdaptedLayer(current)
            set_module(model, path, current)
        current.add(name, method)
        method.attach(current)
    attach_token_rows(model, name, token_plan)
    attach_param_targets(model, name, param_plan, spec.for_layer)
    if spec.options.get("alora_invocation_tokens") is not None:
        state.adapter_hooks[name] = activated_lora.attach(model, [m for _, m in new],
                                                          spec.options["alora_invocation_tokens"])
    state.specs[name] = spec
    link_siblings(model)
    init(model, new, context)
    if dtype is not None:
        for _, method in new:
            method.to(dtype)
        for path in [*saved_paths, *token_plan, *param_plan]:
            model.get_submodule(path).held[name].to(dtype)


def _plan(model: nn.Module, spec: AdapterSpec, method_cls: type[AdapterMethod]) -> tuple:
    """What add_adapter attaches, built before the model changes: (methods by path, their shared module,
    adapted paths, paths saved in full, token rows, parameter targets); raises on anything it cannot build."""
    paths, saved_paths, token_plan, param_plan = _where(model, spec)
    kinds = []
    for path in paths:
        current = _layer_at(model, path)
        kinds.append(current.kind if isinstance(current, AdaptedLayer) else kind_of(current))
    if spec.dropout and any(kind is not None and kind.name == "mha" for kind in kinds):
        warnings.warn(f"dropout={spec.dropout} does not apply to the adapters of nn.MultiheadAttention layers (on "
                      "its input projection and out_proj): they change the attention's weights, not its input "
                      "(PEFT ignores it there too)", stacklevel=2)
    layer_specs = [spec.for_layer(path.removesuffix(ATTENTION_OUT)) for path in paths]  # out_proj: its attention's
    param_keys = [f"{path}.{p}" for path, names in param_plan.items() for p in names]
    _check_patterns(method_cls, spec, {**dict(zip(paths, layer_specs)), **{k: spec.for_layer(k) for k in param_keys}})
    shared = method_cls.make_shared(spec, kinds)
    new: list[tuple[str, AdapterMethod]] = []
    for path, kind, layer_spec in over_layers(list(zip(paths, kinds, layer_specs)), f"{spec.method}: layers"):
        try:
            new.append((path, method_cls(kind, layer_spec, shared=shared)))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return new, shared, paths, saved_paths, token_plan, param_plan


def _where(model: nn.Module, spec: AdapterSpec) -> tuple[list[str], list[str], dict[str, tuple[list[int], str | None]],
                                                        dict[str, list[str]]]:
    """What the adapter goes on, checked before anything changes: the layers its method adapts, the modules
    it saves in full, its token rows (token_rows.plan_token_rows) and the modules whose parameters it
    updates (param_targets.plan_param_targets)."""
    paths = [] if spec.targets == [] else _with_attention_outputs(model, resolve_targets(  # []: none of those
        model, spec.targets, spec.exclude, skip=spec.modules_to_save, layers=spec.layers,
        layers_pattern=spec.layers_pattern))
    saved_paths = _resolve_saved(model, spec.modules_to_save)
    for path in [*paths, *saved_paths]:
        current = _layer_at(model, path)
        if isinstance(current, TokenRows | ParamAdapters):
            what = "trainable token rows" if isinstance(current, TokenRows) else "adapted parameters"
            raise ValueError(f"{path} has another adapter's {what}; it cannot also be adapted or saved in full")
    token_plan = ({} if spec.trainable_token_indices is None else
                  plan_token_rows(model, spec.trainable_token_indices, paths, saved_paths))
    param_plan = ({} if spec.target_parameters is None else
                  plan_param_targets(model, spec.target_parameters, {*paths, *saved_paths, *token_plan}))
    return paths, saved_paths, token_plan, param_plan


ATTENTION_OUT = ".base_layer.out_proj"  # an adapted nn.MultiheadAttention's out_proj, under its wrapper


def _with_attention_outputs(model: nn.Module, paths: list[str]) -> list[str]:
    """PEFT's rule for nn.MultiheadAttention: an adapter on it adapts its packed input projection and its
    out_proj (which the attention reads by weight, never calling it); that out_proj named on its own
    beside it is dropped."""
    out: list[str] = []
    for path in paths:
        module = model.get_submodule(path)
        out.append(path)
        if isinstance(getattr(module, "base_layer", module), nn.MultiheadAttention):
            out.append(path + ATTENTION_OUT)
    attentions = {p.removesuffix(ATTENTION_OUT) for p in out if p.endswith(ATTENTION_OUT)}
    return [p for p in out if p.endswith(ATTENTION_OUT) or p.removesuffix(".out_proj") not in attentions - {p}]


def _layer_at(model: nn.Module, path: str) -> nn.Module:
    """The module at `path`, where `<attention>.base_layer.out_proj` may name the out_proj of an attention
    not wrapped yet."""
    if path.endswith(ATTENTION_OUT):
        attention = model.get_submodule(path.removesuffix(ATTENTION_OUT))
        return getattr(attention, "base_layer", attention).out_proj
    return model.get_submodule(path)


def _resolve_saved(model: nn.Module, keys: list[str]) -> list[str]:
    if not keys:
        return []
    names = [n for n, _ in candidate_modules(model)]
    found = [n for n in names if any(suffix_match(n, k) for k in keys)]
    for key in keys:
        if not any(suffix_match(n, key) for n in found):
            hint = close_matches(key, {n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(f"modules_to_save entry {key!r} matches no module"
                             + (f"; close matches: {', '.join(hint)}" if hint else ""))
    return found


def _apply_trainable(model: nn.Module) -> None:
    """Only the active adapters (and their saved modules and biases) train."""
    state = state_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in wrappers(model):
        for name in module.active:
            for p in module.held[name].parameters():
                p.requires_grad_(True)
    for name in state.active:
        bias = state.specs[name].bias
        if bias == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for _, layer in adapted_layers(model, name):
                if layer.kind.bias is not None:
                    layer.kind.bias.requires_grad_(True)


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make one adapter, or several (their changes add up), the active ones; they also train."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        _known(model, n)
    state_of(model).active = names
    for _, module in wrappers(model):
        module.set_active(names)
    _apply_trainable(model)


def active_adapters(model: nn.Module) -> list[str]:
    return list(state_of(model).active)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block."""
    mods = [m for _, m in wrappers(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(mods, before):
            m.disabled = was


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Inside the block each batch row i uses adapter names[i] alone (None: the base model).

    Works for `model(...)` and `model.generate(...)`; `model(..., adapter_names=[...])` does
    the same for one call.
    """
    for n in names:
        if n is not None:
            _known(model, n)
    plan = RowPlan.from_names(list(names))
    mods = [m for _, m in wrappers(model)]
    for m in mods:
        m.row_plan = plan
    try:
        yield model
    finally:
        for m in mods:
            m.row_plan = None


def _take_adapter_names(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    context = row_adapters(module, names)
    context.__enter__()
    handle: list[Any] = []

    def leave(*_: Any) -> None:
        context.__exit__(None, None, None)
        handle[0].remove()

    handle.append(module.register_forward_hook(leave, always_call=True))
    return args, kwargs


def merge(model: nn.Module, names: str | list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights."""
    refuse_merge(state_of(model))
    names = state_of(model).active if names is None else [names] if isinstance(names, str) else names
    for n in names:
        _known(model, n)
        for _, layer in _mergeable(model):
            if n in layer.held:
                layer.merge(n)


def unmerge(model: nn.Module) -> None:
    """Restore the base weights of every merged layer."""
    for _, layer in _mergeable(model):
        layer.unmerge_all()


def _mergeable(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer | TokenRows | ParamAdapters]]:
    """The wrappers whose adapters fold into the base weights (a module saved in full is swapped in instead)."""
    for path, module in wrappers(model):
        if isinstance(module, AdaptedLayer | TokenRows | ParamAdapters):
            yield path, module


def merge_and_unload(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Merge, then replace every wrapper by the plain module: a model with no trace of loralab."""
    merge(model, names)
    active = state_of(model).active
    for path, module in reversed(list(wrappers(model))):  # inner wrappers first (an attention's out_proj)
        set_module(model, path, module.plain(active))
    for p in model.parameters():
        p.requires_grad_(False)
    for handle in model._loralab.hook_handles:
        handle.remove()
    del model._loralab
    return model


def remove_adapter(model: nn.Module, name: str) -> None:
    """Detach an adapter; layers left with none go back to the plain base layer (and replicated blocks to the
    original ones, once no adapter is left)."""
    _known(model, name)
    _detach(model, name)
    _apply_trainable(model)


def _detach(model: nn.Module, name: str) -> None:
    """Take out whatever of adapter `name` is in the model (all of it, or what a failed add put in)."""
    state = state_of(model)
    for path, module in reversed(list(wrappers(model))):  # inner wrappers first (an attention's out_proj)
        if name in module.held:
            module.remove(name)
        if not module.held:
            set_module(model, path, module.unwrapped)
    state.specs.pop(name, None)
    for handle in state.adapter_hooks.pop(name, []):
        handle.remove()
    state.active = [n for n in state.active if n != name]
    release(state)
    link_siblings(model)


@dataclass
class ParamReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParamReport:
    """Counts of trainable and all parameters (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return ParamReport(trainable, total)


def methods_of(model: nn.Module, name: str) -> Iterator[tuple[str, AdapterMethod]]:
    """(layer path, method module) for every layer holding adapter `name`."""
    _known(model, name)
    for path, layer in adapted_layers(model, name):
        yield path, layer.adapters[name]


