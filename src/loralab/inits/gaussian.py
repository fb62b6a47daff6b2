"""The LoRA paper's initialisation: A ~ N(0, 1/r²), B = 0, so ΔW = 0 at the start (arXiv 2106.09685).

For methods without LoRA's A/B, "gaussian" keeps the method's own initialisation from its paper.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser
from loralab.methods.base import AdapterMethod


@initialiser("gaussian", "A ~ N(0, 1/r²), B = 0 (the LoRA paper); other methods keep their own init", "2106.09685")
@torch.no_grad()
def gaussian(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for _, method in adapted:
        if hasattr(method, "lora_A") and hasattr(method, "lora_B"):
            nn.init.normal_(method.lora_A, std=1.0 / method.r)
            method.lora_B.zero_()
