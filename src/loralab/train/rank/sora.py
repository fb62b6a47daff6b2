"""SoRA's schedule (arXiv 2311.11696): after each optimiser step, the proximal step of an L1
penalty λ‖g‖₁ on every gate, g ← sign(g)·max(|g| − lr·λ, 0), which zeroes gates exactly.
Option: sparsity (λ, default 1e-3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.rank import RANK_SCHEDULES, RankSchedule, check_options, methods_named


@RANK_SCHEDULES.register("sora")
class SoRASchedule(RankSchedule):
    def __init__(self, model: nn.Module, config: Any) -> None:
        self.options = check_options(config.rank_options, {"sparsity": 1e-3}, "sora")
        self.methods = methods_named(model, "sora", "sora")

    @torch.no_grad()
    def on_step_end(self, trainer: Any, step: int, logs: dict) -> None:
        threshold = trainer.scheduler.get_last_lr()[0] * self.options["sparsity"]
        for m in self.methods:
            g = m.lora_gate
            g.copy_(g.sign() * (g.abs() - threshold).clamp_min(0))
        logs["total_rank"] = sum(m.active_rank() for m in self.methods)
