"""AdaLoRA's rank schedule (Zhang et al., arXiv 2303.10512): prune SVD triplets by importance so
the total rank follows a cubic schedule from the initial budget to `target_rank` per layer.

    b(t) = b_T + (b_0 − b_T)·(1 − (t − t_i)/(T − t_i − t_f))³   for t_i ≤ t < T − t_f
Masks are recomputed every `interval` steps from the triplet scores (a pruned triplet can
come back); the orthogonality regulariser ‖PᵀP − I‖² + ‖QQᵀ − I‖² is added to the gradients.
Options: target_rank, warmup (t_i), final (t_f), interval, beta1, beta2, orth_reg.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.rank import RANK_SCHEDULES, check_options, methods_named
from loralab.train.rank.importance import TripletImportance, TripletSchedule

OPTIONS = {"target_rank": None, "warmup": None, "final": None, "interval": 10, "beta1": 0.85, "beta2": 0.85,
           "orth_reg": 0.1}


def budget_at(step: int, total_steps: int, initial: int, target: int, warmup: int, final: int) -> int:
    if step < warmup:
        return initial
    span = max(1, total_steps - warmup - final)
    if step >= total_steps - final:
        return target
    return int(round(target + (initial - target) * (1 - (step - warmup) / span) ** 3))


@RANK_SCHEDULES.register("adalora")
class AdaLoRASchedule(TripletSchedule):
    def __init__(self, model: nn.Module, config: Any) -> None:
        self.options = check_options(config.rank_options, OPTIONS, "adalora")
        self.methods = methods_named(model, "adalora", "adalora")
        self.total_steps = config.max_steps
        r = self.methods[0].r
        target = self.options["target_rank"] or max(1, r // 2)
        if not 1 <= target <= r:
            raise ValueError(f"adalora target_rank must be in [1, r={r}], got {target}")
        self.initial = sum(m.active_rank() for m in self.methods)
        self.target = target * len(self.methods)
        self.warmup = self.options["warmup"] if self.options["warmup"] is not None else config.max_steps // 10
        self.final = self.options["final"] if self.options["final"] is not None else config.max_steps // 5
        self.importance = TripletImportance(self.methods, self.options["beta1"], self.options["beta2"])

    def budget(self, step: int) -> int:
        return budget_at(step, self.total_steps, self.initial, self.target, self.warmup, self.final)

    @torch.no_grad()
    def on_before_step(self, trainer: Any) -> None:
        self.importance.update()
        coef = self.options["orth_reg"]
        if coef:
            for m in self.methods:
                gp, gq = m.orthogonality_grads()
                if m.lora_P.grad is not None:
                    m.lora_P.grad.add_(coef * gp)
                if m.lora_Q.grad is not None:
                    m.lora_Q.grad.add_(coef * gq)

    @torch.no_grad()
    def on_step_end(self, trainer: Any, step: int, logs: dict) -> None:
        if step < self.warmup or (step % self.options["interval"] and step != self.total_steps - self.final):
            return
        keep = self.budget(step)
        scores = torch.cat([self.importance.triplet_scores(m) for m in self.methods])
        mask = torch.zeros_like(scores)
        mask[scores.argsort(descending=True)[:keep]] = 1
        for m, part in zip(self.methods, mask.split([m.r for m in self.methods])):
            m.rank_mask.copy_(part)
        logs["total_rank"] = keep
