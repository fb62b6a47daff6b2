"""AdamW (Loshchilov & Hutter, arXiv 1711.05101) over the trainable parameters; no decay on vectors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.optim import OPTIMIZERS, decay_groups


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas))
