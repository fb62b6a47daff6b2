"""MiLoRA: minor singular component LoRA (Wang et al., arXiv 2406.09044).

PiSSA's construction on the r *smallest* singular triplets of W: the adapter starts in the
minor subspace (least of the pre-trained knowledge), the base keeps W − s·BA.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods, start_from_factors
from loralab.inits.pissa import top_singular
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers


@initialiser("milora", "A, B from W's r smallest singular triplets; the base keeps the rest", "2406.09044")
@torch.no_grad()
def milora(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    for method in over_layers(low_rank_methods(adapted, "milora"), "milora"):
        u, s, vh = top_singular(method.layer.matrix(), method.r, largest=False)
        start_from_factors(method, u * s.sqrt(), s.sqrt()[:, None] * vh)
