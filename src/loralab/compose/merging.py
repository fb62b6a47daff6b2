"""Merge several LoRA adapters into one new LoRA adapter (PEFT format), on a live model
(`combine`) or straight from adapter folders, with no base model needed (`combine_folders`).

The per-layer arithmetic of every merge method is in layer_merges.py; this file gathers each
adapter's factors, checks that the adapters can be combined, and writes the result. Layers
whose merged rank is below the adapter's rank are padded with zero components.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loralab.checkpoint import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    atomic_write,
    read_config,
    read_tensors,
    spec_from_config,
)
from loralab.compose.layer_merges import DENSITY_METHODS, MERGES, Factors
from loralab.model import add_adapter, get_spec, methods_of
from loralab.registry import unknown_name_message
from loralab.spec import AdapterSpec

MERGE_METHODS = sorted(MERGES)
LayerFactors = dict[str, Factors]  # module path → one (A, B·scale) per adapter


def _check(count: int, method: str, weights: list[float] | None, density: float) -> list[float]:
    if method not in MERGES:
        raise ValueError(unknown_name_message("merge method", method, MERGES))
    if count < 1:
        raise ValueError("combine needs at least one adapter")
    weights = [1.0] * count if weights is None else list(weights)
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} adapters; give one weight per adapter")
    if method in DENSITY_METHODS and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return weights


def _align(per_adapter: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], names: list[str],
           allow_partial: bool) -> LayerFactors:
    paths = [set(p) for p in per_adapter]
    union = set().union(*paths)
    if not allow_partial:
        for name, own in zip(names, paths):
            if own != union:
                missing = sorted(union - own)
                raise ValueError(f"adapter {name} lacks layers the others adapt ({', '.join(missing[:3])}"
                                 f"{' …' if len(missing) > 3 else ''}); pass allow_partial=True to treat a "
                                 "missing layer's update as zero")
    out: LayerFactors = {}
    for path in sorted(union):
        some = next(p[path] for p in per_adapter if path in p)
        zero = (some[0].new_zeros(1, some[0].shape[1]), some[1].new_zeros(some[1].shape[0], 1))
        out[path] = [p.get(path, zero) for p in per_adapter]
    return out


def merge_layers(layers: LayerFactors, method: str, weights: list[float], rank: int | None, density: float,
                 seed: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """(path → (A, B)) for the merged adapter and its rank (layers padded to it)."""
    total = max(sum(a.shape[0] for a, _ in factors) for factors in layers.values())
    if rank is not None:
        if rank < 1 or rank > total:
            raise ValueError(f"rank must be in [1, {total}] (the sum of the adapters' ranks), got {rank}")
        for path, factors in layers.items():
            out, inp = factors[0][1].shape[0], factors[0][0].shape[1]
            if rank > min(out, inp):
                raise ValueError(f"rank {rank} exceeds what layer {path} [{out}, {inp}] allows ({min(out, inp)})")
    largest = max(a.shape[0] for factors in layers.values() for a, _ in factors)
    target = rank or (largest if method in ("svd", "lora-lego") else total)  # compressing methods keep max r
    g = torch.Generator().manual_seed(seed)
    merged = {}
    for path, factors in layers.items():
        a, b = MERGES[method](factors, weights, rank=target, density=density, generator=g)
        merged[path] = (a, b)
    width = max(a.shape[0] for a, _ in merged.values())
    return {p: (_pad(a, width, 0), _pad(b, width, 1)) for p, (a, b) in merged.items()}, width


def _pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim).contiguous()


def _lora_factors(tensors: dict[str, torch.Tensor], scale: float, source: str) -> dict[str, tuple]:
    found = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            b = tensors[f"{path}.lora_B.weight"]
            if a.dim() != 2:
                raise ValueError(f"{source}: {path} is not a linear layer; combine merges linear LoRA layers")
            found[path] = (a.float(), scale * b.float())
    if not found:
        raise ValueError(f"{source} holds no LoRA factors (lora_A/lora_B)")
    return found


def combine_folders(adapter_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, method: str = "linear",
                    weights: list[float] | None = None, rank: int | None = None, density: float = 0.5,
                    seed: int = 0, allow_partial: bool = False) -> Path:
    """Merge LoRA adapter folders into a new PEFT-format LoRA folder, without loading any model."""
    weights = _check(len(adapter_dirs), method, weights, density)
    configs = [read_config(d) for d in adapter_dirs]
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) > 1:
        raise ValueError(f"the adapters were trained on different base models: {sorted(map(str, bases))}")
    per_adapter = []
    for d, c in zip(adapter_dirs, configs):
        spec = spec_from_config(c)
        if spec.method != "lora":
            raise ValueError(f"{d} is a {spec.method} adapter; combine merges LoRA adapters")
        per_adapter.append(_lora_factors(read_tensors(d), spec.scale, str(d)))
    merged, width = merge_layers(_align(per_adapter, [str(d) for d in adapter_dirs], allow_partial), method,
                                 weights, rank, density, seed)
    tensors = {}
    for path, (a, b) in merged.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.contiguous()
    config = {**configs[0], "r": width, "lora_alpha": width, "use_rslora": False, "use_dora": False,
              "target_modules": sorted(merged), "modules_to_save": None, "bias": "none"}
    config.pop("loralab", None)
    out = Path(out_dir)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return out


def combine(model: nn.Module, names: list[str], method: str = "linear", weights: list[float] | None = None,
            name: str = "combined", rank: int | None = None, density: float = 0.5, seed: int = 0,
            allow_partial: bool = False) -> nn.Module:
    """Add adapter `name` to `model`: the adapters `names` merged (see layer_merges.py); returns the model."""
    weights = _check(len(names), method, weights, density)
    per_adapter = []
    for n in names:
        if get_spec(model, n).method != "lora":
            raise ValueError(f"adapter {n} is a {get_spec(model, n).method} adapter; combine merges LoRA adapters")
        per_adapter.append({p: (m.lora_A.detach().float(), m.scale * m.lora_B.detach().float())
                            for p, m in methods_of(model, n)})
    merged, width = merge_layers(_align(per_adapter, names, allow_partial), method, weights, rank, density, seed)
    add_adapter(model, AdapterSpec(r=width, alpha=width, targets=sorted(merged)), name=name)
    with torch.no_grad():
        for path, m in methods_of(model, name):
            a, b = merged[path]
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
    return model
