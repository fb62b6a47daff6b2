"""Uni-LoRA: one vector is all you need (Li et al., arXiv 2506.00799).

Every LoRA parameter of every layer of the adapter, flattened into one long vector of size
D (per layer A [r, in] then B [out, r], row by row, the layers in module order), is
reconstructed from ONE trained vector θ ∈ R^d (option `dim`) through a fixed isometric
projection P: each of the D entries reads one randomly assigned entry of θ, scaled by
1/√(count of entries reading it), so the columns of P are orthonormal (PᵀP = I). ΔW = s·B A.
Option `start` says where the reconstruction starts:

- "kaiming" (default): P projects the change of the LoRA parameters from their initial point
  (A₀ Kaiming-uniform, B₀ = 0), the "intrinsic subspace" reading: A = A₀ + (Pθ)_A, B = (Pθ)_B,
  θ = 0 at the start, so ΔW = 0 then. P (each entry drawn independently) and A₀ are regenerated
  from option `seed`. Saved in loralab's layout ("peft_type": "LORALAB"): PEFT has no A₀.
- "uniform", the form of the authors' code and PEFT's UNILORA: A = (Pθ)_A, B = (Pθ)_B with θ drawn
  from U(−bound, bound) (option `bound`, PEFT's init_theta_d_bound), so ΔW is small but not zero at
  the start; P is PEFT's balanced assignment (every θ entry read ⌊D/d⌋ or ⌈D/d⌉ times, NumPy's
  generator seeded with `seed`, PEFT's proj_seed). Saved in PEFT's UNILORA format:
  `base_model.unilora_theta_d` [d] and config `r`, `theta_d_length`, `proj_seed`, `save_indices:
  false`. PEFT's ΔW = B A has no scale: loralab saves √s·θ (ΔW is quadratic in θ), so a reload has
  s = 1 and the same output, up to rounding. PEFT files with `save_indices` (per layer
  `unilora_indices_A/B`, `unilora_scales_A/B`) are read with those indices and scales.

Files of loralab's older layout (θ under `base_model.model.loralab_shared.theta`) still load.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, FactoredMethod, check_shape
from loralab.spec import AdapterSpec

STARTS = ("kaiming", "uniform")
THETA = "unilora_theta_d"  # θ's name in the module and, under `base_model.`, in the file
OLD_THETA = "loralab_shared.theta"  # loralab's older layout, as `read_tensors` leaves it
PEFT_INDEX_KEYS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


def balanced_index(total: int, dim: int, seed: int) -> torch.Tensor:
    """PEFT's assignment of `total` entries to θ's `dim`: each θ entry ⌊total/dim⌋ times, the remainder to
    distinct entries, shuffled (peft.tuners.unilora.UniLoraModel.generate_index, reproduced call for call)."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(dim), total // dim)
    if total % dim:
        data = np.concatenate([data, rng.choice(dim, size=total % dim, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


class Projection(nn.Module):
    """θ and the random assignment of the D LoRA entries to θ's entries, handed out layer by layer."""

    def __init__(self, sizes: list[int], options: dict[str, Any], like: torch.Tensor) -> None:
        super().__init__()
        dim, seed = options["dim"], options["seed"]
        g = torch.Generator().manual_seed(seed)
        if options["start"] == "kaiming":
            index = torch.randint(0, dim, (sum(sizes),), generator=g)
            theta = torch.zeros(dim)
        else:
            index = balanced_index(sum(sizes), dim, seed)
            theta = torch.empty(dim).uniform_(-options["bound"], options["bound"], generator=g)
        counts = torch.bincount(index, minlength=dim).clamp_min(1)
        setattr(self, THETA, nn.Parameter(theta.to(like)))
        self.register_buffer("index", index.to(like.device), persistent=False)
        self.register_buffer("weight", counts[index].to(like.dtype).rsqrt().to(like.device), persistent=False)
        self.cursor = 0
        self.generator = g

    @property
    def theta(self) -> torch.Tensor:
        return getattr(self, THETA)

    def claim(self, size: int) -> slice:
        part = slice(self.cursor, self.cursor + size)
        self.cursor += size
        return part

    def values(self, part: slice) -> torch.Tensor:
        return self.theta[self.index[part]] * self.weight[part]


@METHODS.register("uni-lora")
class UniLoRA(FactoredMethod):
    name = "uni-lora"
    summary = "All layers' LoRA parameters projected from one trained vector θ (isometric random P)"
    paper = "2506.00799"
    param_formula = "d for the whole adapter (option dim)"
    suggested_lr = 5e-3
    peft_type = "UNILORA"
    peft_when = "start='uniform'"
    peft_lacks = ("exclude_modules",)
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"dim": 4096, "seed": 0, "start": "kaiming", "bound": 0.02}
    shared_prefix = "base_model."

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        options = {**cls.option_defaults, **spec.options}
        if options["start"] not in STARTS:
            raise ValueError(f"uni-lora option start must be one of {', '.join(STARTS)}, got {options['start']!r}")
        sizes = [spec.r * (layer.in_features + layer.out_features) for layer in layers]
        return Projection(sizes, options, layers[0].weight)

    @classmethod
    def expected_shared_params(cls, spec: AdapterSpec, layers: list[LayerKind]) -> int:
        return spec.options.get("dim", cls.option_defaults["dim"])

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.part_a = shared.claim(spec.r * layer.in_features)
        self.part_b = shared.claim(spec.r * layer.out_features)
        a0 = torch.zeros(spec.r, layer.in_features)
        if self.options["start"] == "kaiming":
            bound = 1 / math.sqrt(layer.in_features)  # Kaiming-uniform with a = √5, as nn.Linear
            a0.uniform_(-bound, bound, generator=shared.generator)
        self.register_buffer("init_A", a0.to(layer.weight), persistent=False)

    def expected_trainable_params(self) -> int:
        return 0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.init_A + self.shared.values(self.part_a).view_as(self.init_A)
        b = self.shared.values(self.part_b).view(self.layer.out_features, self.r)
        return a, b

    # ---- saving: PEFT's UNILORA format (start="uniform"), loralab's layout (start="kaiming") -------
    def shared_to_saved(self) -> dict[str, torch.Tensor]:
        theta = self.shared.theta.detach()
        return {THETA: theta * math.sqrt(self.scale) if self.options["start"] == "uniform" else theta}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """A PEFT file with save_indices gives this layer's indices and scales: they replace the generated ones."""
        present = [k for k in PEFT_INDEX_KEYS if k in tensors]
        if not present:
            return
        if len(present) < len(PEFT_INDEX_KEYS):
            missing = sorted(set(PEFT_INDEX_KEYS) - set(present))
            raise ValueError(f"adapter file lacks {', '.join(f'{where}.{k}' for k in missing)}")
        shapes = {"A": (self.r, self.layer.in_features), "B": (self.layer.out_features, self.r)}
        with torch.no_grad():
            for side, part in (("A", self.part_a), ("B", self.part_b)):
                index, scale = tensors[f"unilora_indices_{side}"], tensors[f"unilora_scales_{side}"]
                check_shape(f"{where}.unilora_indices_{side}", index.shape, shapes[side])
                check_shape(f"{where}.unilora_scales_{side}", scale.shape, shapes[side])
                if int(index.min()) < 0 or int(index.max()) >= self.shared.theta.numel():
                    raise ValueError(f"{where}.unilora_indices_{side} points outside θ (length "
                                     f"{self.shared.theta.numel()})")
                self.shared.index[part] = index.reshape(-1).to(self.shared.index)
                self.shared.weight[part] = scale.reshape(-1).to(self.shared.weight)

    @classmethod
    def remap_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """loralab's older layout kept θ under loralab_shared.theta."""
        if OLD_THETA not in tensors:
            return tensors
        return {(cls.shared_prefix + THETA if k == OLD_THETA else k): t for k, t in tensors.items()}

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any] | None:
        options = {**cls.option_defaults, **spec.options}
        if options["start"] != "uniform":
            return None  # A₀ has no place in PEFT's format: loralab's layout
        return {"peft_type": "UNILORA", "r": spec.r, "theta_d_length": options["dim"], "proj_seed": options["seed"],
                "init_theta_d_bound": options["bound"], "unilora_dropout": spec.dropout, "init_weights": True,
                "save_indices": False, "bias": "unilora_only" if spec.bias == "lora_only" else spec.bias}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        r = int(config.get("r", 4))
        options = {"dim": int(config.get("theta_d_length", 256)), "seed": int(config.get("proj_seed", 42)),
                   "start": "uniform", "bound": float(config.get("init_theta_d_bound", 0.02))}
        bias = config.get("bias") or "none"
        return {"method": "uni-lora", "r": r, "alpha": float(r), "dropout": float(config.get("unilora_dropout") or 0),
                "options": options, "bias": "lora_only" if bias == "unilora_only" else bias}
