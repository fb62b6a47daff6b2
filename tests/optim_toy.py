"""A one-layer regression with a LoRA adapter, for the optimiser tests."""

from __future__ import annotations

import torch
from torch import nn

import loralab as ll
from loralab.model import methods_of
from loralab.train import TrainConfig
from loralab.train.optim import get_optimizer


def toy(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10))
    ll.add_adapter(model, ll.AdapterSpec(r=3, alpha=6, targets=["0"]))
    (_, method), = list(methods_of(model, "default"))
    with torch.no_grad():
        method.lora_B.normal_(std=0.1)
    x = torch.randn(32, 12)
    target = x @ torch.randn(12, 10) * 0.3
    return model, method, x, target


def loss_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (model(x) - target).pow(2).mean()


def run(name: str, steps: int = 20, lr: float = 1e-2, **options) -> tuple[list[float], nn.Module, object]:
    model, method, x, target = toy()
    opt = get_optimizer(name)(model, TrainConfig(lr=lr, optimizer=name, optimizer_options=options))
    losses = []
    for _ in range(steps):
        loss = loss_of(model, x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, method, opt
