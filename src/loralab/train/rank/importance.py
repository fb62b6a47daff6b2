"""AdaLoRA's sensitivity-based importance of SVD triplets (arXiv 2303.10512, §3.2), shared by the
AdaLoRA (prune) and IncreLoRA (grow) schedules.

Per parameter entry: I = |θ·∇θ|, smoothed Ī ← β₁Ī + (1−β₁)I, uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|,
score s = Ī·Ū. Triplet i of a layer scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).
"""

from __future__ import annotations

from typing import Any

import torch

from loralab.train.rank import RankSchedule

PARTS = ("lora_P", "lora_E", "lora_Q")


class TripletImportance:
    def __init__(self, methods: list, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.methods = methods
        self.index = {id(m): i for i, m in enumerate(methods)}
        self.beta1, self.beta2 = beta1, beta2
        self.mean: dict[tuple[int, str], torch.Tensor] = {}  # keyed by (method index, parameter name)
        self.unc: dict[tuple[int, str], torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        for i, m in enumerate(self.methods):
            for part in PARTS:
                p = getattr(m, part)
                if p.grad is None:
                    continue
                now = (p * p.grad).abs()
                key = (i, part)
                mean = self.mean.get(key, torch.zeros_like(now))
                mean = self.beta1 * mean + (1 - self.beta1) * now
                self.unc[key] = self.beta2 * self.unc.get(key, torch.zeros_like(now)) + (1 - self.beta2) * (
                    now - mean).abs()
                self.mean[key] = mean

    def _score(self, method, part: str) -> torch.Tensor:
        key = (self.index[id(method)], part)
        if key not in self.mean:
            return torch.zeros_like(getattr(method, part))
        return self.mean[key] * self.unc[key]

    def triplet_scores(self, method) -> torch.Tensor:
        return (self._score(method, "lora_E") + self._score(method, "lora_P").mean(0)
                + self._score(method, "lora_Q").mean(1))


class TripletSchedule(RankSchedule):
    """A schedule that sets AdaLoRA's triplet masks from `self.importance`: its checkpointed state is
    the importance averages and the masks (buffers, which the trainer's parameter checkpoint lacks)."""

    methods: list
    importance: TripletImportance

    def state_dict(self) -> dict[str, Any]:
        return {"mean": {k: v.clone() for k, v in self.importance.mean.items()},
                "unc": {k: v.clone() for k, v in self.importance.unc.items()},
                "masks": [m.rank_mask.clone() for m in self.methods]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["masks"]) != len(self.methods):
            raise ValueError(f"the checkpoint's rank schedule covers {len(state['masks'])} layers, "
                             f"this model has {len(self.methods)}")
        for m, mask in zip(self.methods, state["masks"]):
            m.rank_mask.copy_(mask)
        self.importance.mean = dict(state["mean"])
        self.importance.unc = dict(state["unc"])
