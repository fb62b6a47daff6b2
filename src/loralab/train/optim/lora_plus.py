"""LoRA+ (Hayou et al., arXiv 2402.12354): B learns `ratio` times faster than A (default 16).

Option: `optimizer_options={"ratio": λ}` (CLI: --optimizer lora+).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.train.optim import OPTIMIZERS, decay_groups
from loralab.train.optim.lowrank import lora_factors


@OPTIMIZERS.register("lora+")
def lora_plus(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    ratio = float(config.optimizer_options.get("ratio", 16.0))
    if ratio <= 0:
        raise ValueError(f"lora+ ratio must be > 0, got {ratio}")
    b_params = [f.b for f in lora_factors(model) if f.b.requires_grad]
    b_ids = {id(p) for p in b_params}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in b_ids]}
              for g in decay_groups(model, config.weight_decay)]
    groups.append({"params": b_params, "lr": config.lr * ratio, "weight_decay": config.weight_decay})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas))
