"""The initialiser protocol: how an adapter's tensors start.

An initialiser is a callable `(model, adapted, context) -> None` registered by name. It
sees every (module path, method) pair of the new adapter at once, because data-driven
initialisers (LoRA-GA, EVA, CorDA, …) need model-wide forward or backward passes; the
context carries the calibration batches, their budget and the init's options
(`AdapterSpec.init_options`, checked against the defaults the initialiser declares).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from loralab.methods.base import AdapterMethod
from loralab.registry import Registry


@dataclass
class InitContext:
    calibration: Iterable[Any] | None = None  # batches (dicts of tensors) for data-driven inits
    budget: int = 8  # how many calibration batches to use
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None  # default: model(**batch).loss
    options: dict[str, Any] = field(default_factory=dict)  # AdapterSpec.init_options


InitFn = Callable[[nn.Module, list[tuple[str, AdapterMethod]], InitContext], None]


@dataclass(frozen=True)
class Initialiser:
    fn: InitFn
    summary: str
    paper: str = ""  # arXiv id
    needs_data: bool = False  # refuses to run without calibration batches
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # the options it takes, with their defaults

    def __call__(self, model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
        unknown = sorted(set(context.options) - set(self.options))
        if unknown:
            raise ValueError(f"init {self.name!r} does not take option(s) {unknown}; "
                             f"it takes: {', '.join(sorted(self.options)) or 'none'}")
        if self.needs_data and context.calibration is None:
            raise ValueError("this initialiser needs calibration data: pass calibration=<batches> to add_adapter "
                             "(or --calibration-batches N on the command line)")
        self.fn(model, adapted, replace(context, options={**self.options, **context.options}))


INITS: Registry[Initialiser] = Registry("init", "loralab.inits")


def initialiser(name: str, summary: str, paper: str = "", needs_data: bool = False,
                options: dict[str, Any] | None = None) -> Callable[[InitFn], InitFn]:
    """Register `fn` as init `name`; `options` are the init_options it takes, with their defaults."""

    def add(fn: InitFn) -> InitFn:
        INITS.register(name)(Initialiser(fn, summary, paper, needs_data, name, dict(options or {})))
        return fn

    return add


def start_from_factors(method: AdapterMethod, b: torch.Tensor, a: torch.Tensor) -> None:
    """Start with s·BA = b @ a (B = b/√s, A = a/√s) and move that part out of the base weight, so the
    output is unchanged (see `start_from`)."""
    root = method.scale ** 0.5
    start_from(method, b / root, a / root)


@torch.no_grad()
def start_from(method: AdapterMethod, b: torch.Tensor, a: torch.Tensor) -> None:
    """Start with B = b and A = a and move s·BA out of the base weight, so the output is unchanged.

    The method remembers the factors it started from (`base_offset`): the base now differs
    from the original by −s·B₀A₀, and saving converts the adapter back to one that applies to
    the original base (see checkpoint.py).
    """
    method.lora_B.copy_(b)
    method.lora_A.copy_(a)
    layer = method.layer
    weight = layer.weight
    residual = layer.matrix(weight.detach()).float() - method.scale * (b.float() @ a.float())
    weight.copy_(layer.to_weight(residual.to(weight.dtype)))
    method.base_offset = (method.lora_A.detach().clone(), method.lora_B.detach().clone())


@torch.no_grad()
def undo_start(method: AdapterMethod) -> None:
    """Put s·B₀A₀ back into the base weight where `start_from` moved it out (an add that failed later)."""
    offset = getattr(method, "base_offset", None)
    if offset is None:
        return
    a, b = offset
    weight = method.layer.weight
    restored = method.layer.matrix(weight.detach()).float() + method.scale * (b.float() @ a.float())
    weight.copy_(method.layer.to_weight(restored.to(weight.dtype)))
    method.base_offset = None


def low_rank_methods(adapted: list[tuple[str, AdapterMethod]], init: str) -> list[AdapterMethod]:
    """The methods that hold LoRA's A and B; an init that works on A/B refuses the rest."""
    out = []
    for path, method in adapted:
        if not (hasattr(method, "lora_A") and hasattr(method, "lora_B")):
            raise ValueError(f"init {init!r} sets LoRA's A and B, but method {method.name!r} at {path} has none")
        out.append(method)
    return out
