"""Optimisers by name (`TrainConfig(optimizer=...)`, `loralab train --optimizer`): one file each.

An optimiser factory takes (model, config) and returns a torch.optim.Optimizer over the
model's trainable parameters; methods such as LoRA+ group A and B with their own rates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from loralab.registry import Registry

OptimizerFactory = Callable[[nn.Module, Any], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", "loralab.train.optim")


def get_optimizer(name: str) -> OptimizerFactory:
    return OPTIMIZERS.get(name)


def list_optimizers() -> list[str]:
    return OPTIMIZERS.names()


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, vectors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
