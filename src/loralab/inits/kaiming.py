"""HF PEFT's default: A Kaiming-uniform (a=√5, as nn.Linear), B = 0, so ΔW = 0 at the start."""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods
from loralab.methods.base import AdapterMethod


@initialiser("kaiming", "A Kaiming-uniform, B = 0 (HF PEFT's default)")
@torch.no_grad()
def kaiming(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for method in low_rank_methods(adapted, "kaiming"):
        nn.init.kaiming_uniform_(method.lora_A, a=math.sqrt(5))
        method.lora_B.zero_()
