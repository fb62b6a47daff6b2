"""OLoRA: orthonormal LoRA initialisation by QR (Büyükakyüz, arXiv 2406.01775).

W = QR; B = Q[:, :r] (orthonormal columns), A = R[:r], unscaled; the base keeps W − s·BA (as the
paper and PEFT's `init_lora_weights="olora"`, which its author wrote, do).
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods, start_from
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers


@initialiser("olora", "B, A from the QR decomposition of W (orthonormal B); the base keeps the residual",
             "2406.01775")
@torch.no_grad()
def olora(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for method in over_layers(low_rank_methods(adapted, "olora"), "olora"):
        q, r = torch.linalg.qr(method.layer.matrix().float())
        start_from(method, q[:, : method.r], r[: method.r])
