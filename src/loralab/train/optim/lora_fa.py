"""LoRA-FA (Zhang et al., arXiv 2308.03303): A stays frozen at its random init, only B trains.

Saves A's gradients and optimiser state; ΔW = s·BA moves within the column space fixed by A.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.optim import OPTIMIZERS, decay_groups
from loralab.train.optim.lowrank import lora_factors


@OPTIMIZERS.register("lora-fa")
def lora_fa(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    factors = lora_factors(model)
    frozen_b = sum(not f.b.requires_grad for f in factors)
    if frozen_b:
        raise ValueError(f"lora-fa freezes A and trains B alone, but {frozen_b} of the {len(factors)} adapted layers "
                         "have B frozen already (init 'mica' trains A alone): nothing would train there; use "
                         "another optimiser, e.g. adamw")
    for f in factors:
        f.a.requires_grad_(False)
    return torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas))
