"""SHiRA: sparse high-rank adapters (Bhardwaj et al., arXiv 2406.13175).

A fixed sparse mask M chosen at the start — random (seeded) or the largest-|W| entries
(option `mask`) — with `density` of the entries; only the masked entries train:
ΔW = M ⊙ S, stored as nnz values and their indices, so the parameter count is exactly nnz.
The update can be full rank, and it changes few weights, so switching adapters is cheap.
With `density=None` the mask has PEFT's size, nnz = r·(in + out) (as many parameters as a rank-r LoRA);
the random mask is then PEFT's own: the first nnz of torch.randperm(out·in) from a CPU generator seeded
with option `seed` (None: an unseeded generator, as PEFT's `random_seed=None`).

Saved in PEFT's SHiRA format: per layer `shira_weight` [nnz] and `shira_indices` [2, nnz] (int32 rows and
columns of the [out, in] ΔW); the config's `r`, `mask_type` and `random_seed` (option `seed`). As the file holds
the indices, either library reads any mask in it, and a PEFT file with a mask_type of its own loads as mask
"random". loralab's own `density` sizing is kept in the config's `loralab` section, which PEFT ignores: PEFT
reads such a file only where nnz = r·(in + out) on every layer (elsewhere it stops at the size mismatch).
PEFT's SHiRA has no dropout (not kept in the file: training only) and no `bias` setting (it loads saved
biases, but warns it ignores the field). PEFT's SHiRA takes nn.Linear only: a SHiRA on GPT-2's Conv1D,
nn.Conv2d or nn.Embedding is read by loralab alone. Files in loralab's old layout (`shira_values`, the flat
indices `mask_index`, peft_type LORALAB) are read too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, check_shape
from loralab.spec import AdapterSpec

MASKS = ("random", "weight-magnitude")


@METHODS.register("shira")
class SHiRA(AdapterMethod):
    name = "shira"
    summary = "Train a fixed sparse subset of W's entries (random or largest-|W| mask)"
    paper = "2406.13175"
    param_formula = "⌈density·out·in⌉, or r·(in + out) with density None"
    peft_type = "SHIRA"
    peft_lacks = ("bias", "exclude_modules", "layers_pattern", "layers_to_transform")
    suggested_lr = 3e-3
    option_defaults = {"density": 0.01, "mask": "random", "seed": 0}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        density, mask = self.options["density"], self.options["mask"]
        if density is not None and not 0 < density <= 1:
            raise ValueError(f"shira density must be in (0, 1] or None (r·(in + out) entries), got {density}")
        if mask not in MASKS:
            raise ValueError(f"shira mask must be one of {', '.join(MASKS)}, got {mask!r}")
        size = layer.out_features * layer.in_features
        nnz = spec.r * (layer.in_features + layer.out_features) if density is None else max(1, round(density * size))
        if nnz > size:
            raise ValueError(f"shira with density None trains r·(in + out) = {nnz} entries, more than the layer's "
                             f"out·in = {size}; lower r")
        if mask == "random":
            g = torch.Generator()
            if self.options["seed"] is not None:
                g.manual_seed(self.options["seed"])
            flat = torch.randperm(size, generator=g)[:nnz]
        else:
            flat = layer.matrix().detach().abs().flatten().topk(nnz).indices.cpu()
        self.register_buffer("mask_index", flat.sort().values.to(layer.weight.device))
        self.shira_values = nn.Parameter(torch.zeros(nnz, dtype=layer.weight.dtype, device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r sizes the mask only with density None

    def expected_trainable_params(self) -> int:
        return self.shira_values.numel()

    def delta_weight(self) -> torch.Tensor:
        flat = self.shira_values.new_zeros(self.layer.out_features * self.layer.in_features)
        return flat.index_put((self.mask_index,), self.shira_values).view(self.layer.out_features, -1)

    # ---- PEFT's SHiRA format ---------------------------------------------------------------
    def to_saved(self) -> dict[str, torch.Tensor]:
        rows, cols = self.mask_index // self.layer.in_features, self.mask_index % self.layer.in_features
        return {"shira_weight": self.shira_values.detach(), "shira_indices": torch.stack([rows, cols]).int()}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Reads PEFT's `shira_weight` and `shira_indices`, or loralab's old layout (`shira_values` and the
        flat `mask_index`)."""
        old = "shira_values" in tensors and "shira_weight" not in tensors
        keys = ("shira_values", "mask_index") if old else ("shira_weight", "shira_indices")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"adapter file lacks {', '.join(f'{where}.{k}' for k in missing)}")
        values, index = tensors[keys[0]], tensors[keys[1]].long()  # PEFT on Windows saves the indices as floats
        nnz = self.shira_values.numel()
        check_shape(f"{where}.{keys[0]}", values.shape, (nnz,))
        check_shape(f"{where}.{keys[1]}", index.shape, (nnz,) if old else (2, nnz))
        with torch.no_grad():
            self.shira_values.copy_(values)
            self.mask_index.copy_(index if old else index[0] * self.layer.in_features + index[1])

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        config = {"peft_type": "SHIRA", "r": spec.r, "mask_type": options["mask"], "random_seed": options["seed"],
                  "init_weights": True}
        if options["density"] is not None:
            config["loralab"] = {"density": options["density"]}
        return config

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        mask = config.get("mask_type", "random")
        options = {"density": (config.get("loralab") or {}).get("density"),
                   "mask": mask if mask in MASKS else "random",  # the file holds the indices of any mask
                   "seed": config.get("random_seed")}
        return {"method": "shira", "r": int(config.get("r", 32)), "options": options}
