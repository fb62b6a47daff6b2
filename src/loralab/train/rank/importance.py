"""AdaLoRA's sensitivity-based importance of SVD triplets (arXiv 2303.10512, §3.2), shared by the
AdaLoRA (prune) and IncreLoRA (grow) schedules.

Per parameter entry: I = |θ·∇θ|, smoothed Ī ← β₁Ī + (1−β₁)I, uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|,
score s = Ī·Ū. Triplet i of a layer scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).
"""

from __future__ import annotations

import torch


class TripletImportance:
    def __init__(self, methods: list, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.methods = methods
        self.beta1, self.beta2 = beta1, beta2
        self.mean: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        for m in self.methods:
            for p in (m.lora_P, m.lora_E, m.lora_Q):
                if p.grad is None:
                    continue
                now = (p * p.grad).abs()
                key = id(p)
                mean = self.mean.get(key, torch.zeros_like(now))
                mean = self.beta1 * mean + (1 - self.beta1) * now
                self.unc[key] = self.beta2 * self.unc.get(key, torch.zeros_like(now)) + (1 - self.beta2) * (
                    now - mean).abs()
                self.mean[key] = mean

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        key = id(p)
        if key not in self.mean:
            return torch.zeros_like(p)
        return self.mean[key] * self.unc[key]

    def triplet_scores(self, method) -> torch.Tensor:
        return (self._score(method.lora_E) + self._score(method.lora_P).mean(0)
                + self._score(method.lora_Q).mean(1))
