"""EVA: explained-variance adaptation (Paischer et al., arXiv 2410.07170).

A starts as the top-r right singular vectors of each layer's input activations on a few
calibration batches (the eigenvectors of the input covariance with the largest eigenvalues),
B = 0, so the adapter starts in the directions the data actually uses and the output is
unchanged. (EVA's optional redistribution of ranks across layers is not done here.)
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods
from loralab.inits.calibration import input_covariances
from loralab.methods.base import AdapterMethod


@initialiser("eva", "A = top-r right singular vectors of the layer inputs on calibration data, B = 0",
             "2410.07170", needs_data=True)
@torch.no_grad()
def eva(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    low_rank_methods(adapted, "eva")
    covariances = input_covariances(model, adapted, context, "eva: input activations")
    for path, method in adapted:
        _, vectors = torch.linalg.eigh(covariances[path])
        top = vectors[:, -method.r:].flip(1).T  # [r, in], largest eigenvalue first
        method.lora_A.copy_(top.to(method.lora_A.dtype))
        method.lora_B.zero_()
