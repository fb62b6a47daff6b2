"""IncreLoRA's rank schedule (Zhang et al., arXiv 2308.12043): start small and add SVD triplets,
every `interval` steps, to the layers whose active triplets matter most (AdaLoRA's
importance), until the total reaches `target_rank` per layer.

Use with `AdapterSpec(method="adalora", r=<max rank>, options={"init_rank": 1})`.
Options: target_rank, interval, grow (triplets added per interval), warmup, beta1, beta2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.rank import RANK_SCHEDULES, check_options, methods_named
from loralab.train.rank.importance import TripletImportance, TripletSchedule

OPTIONS = {"target_rank": None, "interval": 10, "grow": 1, "warmup": 0, "beta1": 0.85, "beta2": 0.85}


@RANK_SCHEDULES.register("increlora")
class IncreLoRASchedule(TripletSchedule):
    def __init__(self, model: nn.Module, config: Any) -> None:
        self.options = check_options(config.rank_options, OPTIONS, "increlora")
        self.methods = methods_named(model, "adalora", "increlora")
        r = self.methods[0].r
        target = self.options["target_rank"] or r
        if not 1 <= target <= r:
            raise ValueError(f"increlora target_rank must be in [1, r={r}] (r is the most a layer can grow to)")
        self.budget = target * len(self.methods)
        self.importance = TripletImportance(self.methods, self.options["beta1"], self.options["beta2"])

    def on_before_step(self, trainer: Any) -> None:
        self.importance.update()

    @torch.no_grad()
    def on_step_end(self, trainer: Any, step: int, logs: dict) -> None:
        if step < self.options["warmup"] or step % self.options["interval"]:
            return
        for _ in range(self.options["grow"]):
            total = sum(m.active_rank() for m in self.methods)
            growable = [m for m in self.methods if m.active_rank() < m.r]
            if total >= self.budget or not growable:
                break
            best = max(growable, key=lambda m: float(self.importance.triplet_scores(m)[m.rank_mask.bool()].mean()))
            best.rank_mask[best.active_rank()] = 1
        logs["total_rank"] = sum(m.active_rank() for m in self.methods)
