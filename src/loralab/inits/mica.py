"""MiCA: minor component adaptation (arXiv 2604.01694), as HF PEFT's `init_lora_weights="mica"`.

B is set to the r left singular vectors of W with the smallest singular values and frozen; A starts
at zero and alone trains. The update B·A thus moves only within W's minor output directions, and as
A = 0 the output starts as the base's without changing W. Frozen, B is kept as a buffer (saved under
its LoRA name, so the file is PEFT's), which no change of the active adapters makes trainable again.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods
from loralab.inits.pissa import top_singular
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers


def freeze_b(method: AdapterMethod, value: torch.Tensor) -> None:
    """Replace the method's trained B by a buffer holding `value` (its dtype and device)."""
    old = method.lora_B
    del method.lora_B
    method.register_buffer("lora_B", value.to(dtype=old.dtype, device=old.device).contiguous())


@initialiser("mica", "B from W's r minor left singular vectors, frozen; A = 0 and alone trains", "2604.01694")
@torch.no_grad()
def mica(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for method in over_layers(low_rank_methods(adapted, "mica"), "mica"):
        u, _, _ = top_singular(method.layer.matrix(), method.r, largest=False)  # (r <= min(out, in): LoRA's bound)
        method.lora_A.zero_()
        freeze_b(method, u)
