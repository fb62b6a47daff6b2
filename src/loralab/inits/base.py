"""The initialiser protocol: how an adapter's tensors start.

An initialiser is a callable `(model, adapted, context) -> None` registered by name. It
sees every (module path, method) pair of the new adapter at once, because data-driven
initialisers (LoRA-GA, EVA, CorDA, …) need model-wide forward or backward passes; the
context carries the calibration batches and their budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from loralab.methods.base import AdapterMethod
from loralab.registry import Registry


@dataclass
class InitContext:
    calibration: Iterable[Any] | None = None  # batches (dicts of tensors) for data-driven inits
    budget: int = 8  # how many calibration batches to use
    needs_data: bool = False


Initialiser = Callable[[nn.Module, list[tuple[str, AdapterMethod]], InitContext], None]
INITS: Registry[Initialiser] = Registry("init", "loralab.inits")


def low_rank_methods(adapted: list[tuple[str, AdapterMethod]], init: str) -> list[AdapterMethod]:
    """The methods that hold LoRA's A and B; an init that works on A/B refuses the rest."""
    out = []
    for path, method in adapted:
        if not (hasattr(method, "lora_A") and hasattr(method, "lora_B")):
            raise ValueError(f"init {init!r} sets LoRA's A and B, but method {method.name!r} at {path} has none")
        out.append(method)
    return out
