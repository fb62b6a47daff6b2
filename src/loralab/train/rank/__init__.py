"""Rank schedules (`TrainConfig(rank_schedule=...)`, `loralab train --rank-schedule`): trainer
callbacks that prune, grow or sample adapter ranks during training. One file each.

A schedule is a class built with (model, config) whose hooks the Trainer calls:
`on_step_begin(trainer, step)`, `on_before_step(trainer)` (gradients ready, before clipping
and the optimiser step), `on_step_end(trainer, step, logs)` and `on_train_end(trainer)`;
its options come from `config.rank_options`. Schedules derive from `RankSchedule`, whose
`state_dict()` / `load_state_dict()` carry what they change during training and no trainable
parameter holds (importance averages, masks, …), so a resumed run is exact.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from loralab.model import wrappers
from loralab.registry import Registry

RANK_SCHEDULES: Registry[type] = Registry("rank schedule", "loralab.train.rank")


class RankSchedule:
    """The base of every rank schedule: the state a trainer checkpoint keeps (by default none)."""

    def state_dict(self) -> dict[str, Any]:
        """What the schedule changed during training that is not a trainable parameter."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the trainer calls it before it loads the parameters and the optimiser."""


def get_rank_schedule(name: str) -> type:
    return RANK_SCHEDULES.get(name)


def list_rank_schedules() -> list[str]:
    return RANK_SCHEDULES.names()


def methods_named(model: nn.Module, method: str, schedule: str) -> list[Any]:
    """The active adapter methods of one kind; a schedule that needs them refuses a model without."""
    found = []
    for _, module in wrappers(model):
        for name in getattr(module, "active", []):
            adapters = getattr(module, "adapters", {})
            if name in adapters and adapters[name].name == method:
                found.append(adapters[name])
    if not found:
        raise ValueError(f"rank schedule {schedule!r} needs adapters of method {method!r} "
                         f"(AdapterSpec(method={method!r}))")
    return found


def check_options(options: dict[str, Any], allowed: dict[str, Any], schedule: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"rank schedule {schedule!r} does not take option(s) {unknown}; "
                         f"it takes: {', '.join(sorted(allowed))}")
    return {**allowed, **options}
