"""A two-layer regression net with HF-style keyword inputs, and calibration batches for it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

import loralab as ll
from loralab.model import methods_of


class CalibNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(12, 10)
        self.second = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        out = self.second(torch.tanh(self.first(x)))
        loss = None if labels is None else (out - labels).pow(2).mean()
        return SimpleNamespace(logits=out, loss=loss)


def batches(n: int = 4, directions: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Inputs concentrated on `directions` (rows) when given, plus small noise."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        if directions is None:
            x = torch.randn(16, 12, generator=g)
        else:
            noise = 0.01 * torch.randn(16, 12, generator=g)
            x = 3 * torch.randn(16, directions.shape[0], generator=g) @ directions + noise
        out.append({"x": x, "labels": torch.randn(16, 6, generator=g)})
    return out


def with_init(init: str, calibration: list, r: int = 3, targets=("first", "second")) -> tuple:
    original = CalibNet()
    model = copy.deepcopy(original)
    ll.add_adapter(model, ll.AdapterSpec(r=r, alpha=2 * r, targets=list(targets), init=init), calibration=calibration)
    return original, model, dict(methods_of(model, "default"))
