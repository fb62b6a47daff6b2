"""SHiRA: sparse high-rank adapters (Bhardwaj et al., arXiv 2406.13175).

A fixed sparse mask M chosen at the start — random (seeded) or the largest-|W| entries
(option `mask`) — with `density` of the entries; only the masked entries train:
ΔW = M ⊙ S, stored as nnz values and their indices, so the parameter count is exactly nnz.
The update can be full rank, and it changes few weights, so switching adapters is cheap.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec

MASKS = ("random", "weight-magnitude")


@METHODS.register("shira")
class SHiRA(AdapterMethod):
    name = "shira"
    summary = "Train a fixed sparse subset of W's entries (random or largest-|W| mask)"
    paper = "2406.13175"
    param_formula = "⌈density·out·in⌉"
    suggested_lr = 3e-3
    option_defaults = {"density": 0.01, "mask": "random", "seed": 0}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        density, mask = self.options["density"], self.options["mask"]
        if not 0 < density <= 1:
            raise ValueError(f"shira density must be in (0, 1], got {density}")
        if mask not in MASKS:
            raise ValueError(f"shira mask must be one of {', '.join(MASKS)}, got {mask!r}")
        size = layer.out_features * layer.in_features
        nnz = max(1, int(round(density * size)))
        if mask == "random":
            flat = torch.randperm(size, generator=torch.Generator().manual_seed(self.options["seed"]))[:nnz]
        else:
            flat = layer.matrix().detach().abs().flatten().topk(nnz).indices.cpu()
        self.register_buffer("mask_index", flat.sort().values.to(layer.weight.device))
        self.shira_values = nn.Parameter(torch.zeros(nnz, dtype=layer.weight.dtype, device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r is unused

    def expected_trainable_params(self) -> int:
        return self.shira_values.numel()

    def delta_weight(self) -> torch.Tensor:
        flat = self.shira_values.new_zeros(self.layer.out_features * self.layer.in_features)
        return flat.index_put((self.mask_index,), self.shira_values).view(self.layer.out_features, -1)
