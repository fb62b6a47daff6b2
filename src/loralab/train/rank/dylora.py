"""DyLoRA's schedule (arXiv 2210.07558): each step trains a random truncation b ~ U{1..r};
outside training steps (evaluation, saving, inference) the full rank r is active. Step t's b is
drawn from a generator seeded with (seed, t), so the schedule has no state and resumes exactly."""

from __future__ import annotations

import random
from typing import Any

from torch import nn

from loralab.train.rank import RANK_SCHEDULES, RankSchedule, check_options, methods_named


def set_rank(model: nn.Module, rank: int) -> None:
    """Use the first `rank` components of every DyLoRA adapter (1 ≤ rank ≤ r)."""
    for m in methods_named(model, "dylora", "dylora"):
        if not 1 <= rank <= m.r:
            raise ValueError(f"DyLoRA rank must be in [1, {m.r}], got {rank}")
        m.active_rank = rank


@RANK_SCHEDULES.register("dylora")
class DyLoRASchedule(RankSchedule):
    def __init__(self, model: nn.Module, config: Any) -> None:
        self.options = check_options(config.rank_options, {"min_rank": 1}, "dylora")
        self.methods = methods_named(model, "dylora", "dylora")
        self.seed = config.seed
        self.r = self.methods[0].r

    def _set(self, rank: int) -> None:
        for m in self.methods:
            m.active_rank = rank

    def on_step_begin(self, trainer: Any, step: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + step)
        self._set(rng.randint(self.options["min_rank"], self.r))

    def on_step_end(self, trainer: Any, step: int, logs: dict) -> None:
        self._set(self.r)
