"""Merge several LoRA adapters into one new LoRA adapter: on a live model (`combine`) or
straight from PEFT-format adapter folders (`combine_folders`), which needs no base model
because a LoRA layer's update is ΔW = s·B·A from its files alone.

This file gathers each adapter's factors (s_i·w_i folded into B_i), checks that the adapters
can be combined (same base, same layers unless `allow_partial`, one weight each, a valid
density and rank) and writes the result; the per-layer arithmetic of each method is in
merges/ (one file per method). The merged adapter has one rank r for every layer (what the
PEFT format and loralab read); a layer whose merge came out with fewer components is padded
with zero ones, and its scale is 1 (lora_alpha = r).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from loralab.checkpoint import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    atomic_write,
    load_adapter,
    read_config,
    read_tensors,
    save_adapter,
    spec_from_config,
)
from loralab.compose.merges import MERGES, MergeMethod, MergeOptions
from loralab.methods.base import METHODS
from loralab.methods.lora import LoRA
from loralab.model import (
    active_adapters,
    adapter_names,
    add_adapter,
    get_spec,
    methods_of,
    remove_adapter,
    set_active,
)
from loralab.peft_lora_fields import check_file_alone
from loralab.spec import AdapterSpec

Pair = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], s·B [out, r]) of one layer
FACTOR_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def list_merge_methods() -> list[str]:
    """The names `combine` accepts for `method`."""
    return MERGES.names()


def combine(model: nn.Module, names: list[str], method: str = "linear", weights: list[float] | None = None,
            name: str = "combined", rank: int | None = None, density: float = 0.5, seed: int = 0,
            allow_partial: bool = False) -> nn.Module:
    """Add adapter `name` to `model`: the LoRA-family adapters `names` merged by `method`; it becomes active.

    weights: one per adapter (default all 1); rank: the result's rank where the method takes one
    (svd, lora-lego: default the largest r_i, at most Σ r_i; ties, dare, dare-ties, magnitude-prune:
    default Σ r_i); density: the kept fraction for ties/dare/magnitude-prune, in (0, 1]; seed: for
    dare's drops and lora-lego's clustering; allow_partial: a layer some adapter lacks counts as
    ΔW = 0 for it (otherwise the adapters must adapt the same layers). Returns the model.
    """
    names = [names] if isinstance(names, str) else list(names)
    return _combine_live(model, names, names, method, weights, name, rank, density, seed, allow_partial)


def combine_folders(adapter_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, method: str = "linear",
                    weights: list[float] | None = None, base: str | nn.Module | None = None, rank: int | None = None,
                    density: float = 0.5, seed: int = 0, allow_partial: bool = False) -> Path:
    """Merge PEFT-format LoRA adapter folders into a new one at `out_dir` (options as in `combine`).

    No model is loaded: the merge works on the files' factors. With `base` (a model, an embedded
    name or a local HF folder) the adapters are loaded onto it instead, merged there and saved
    with `save_adapter` (same result), which also merges loralab's other LoRA-family adapters
    (dylora, sora, …) whose files need their method to read; `base` is left without them.
    """
    dirs = [Path(d) for d in adapter_dirs]
    merge = MERGES.get(method)  # an unknown name fails with close matches
    _check_args(merge, len(dirs), weights, density)
    configs = [read_config(d) for d in dirs]
    base_name = _common_base(dirs, configs)
    if base is not None:
        model = _load_base(base) if isinstance(base, str | os.PathLike) else base
        return _combine_through(model, dirs, out_dir, method, weights, rank, density, seed, allow_partial)
    files = [_folder_factors(d, c) for d, c in zip(dirs, configs)]
    merged, width = _merge([f[0] for f in files], [str(d) for d in dirs], merge, weights, rank, density, seed,
                           allow_partial)
    layouts = {path: layout for f in reversed(files) for path, layout in f[1].items()}
    dtype = files[0][2]
    tensors = {}
    for path, (a, b) in merged.items():
        a_key, b_key, a_tail, b_tail = layouts[path]
        tensors[f"{PREFIX}{path}.{a_key}"] = a.reshape(width, *a_tail).to(dtype).contiguous()
        tensors[f"{PREFIX}{path}.{b_key}"] = b.reshape(b.shape[0], width, *b_tail).to(dtype).contiguous()
    config = _merged_config(configs, base_name, width, sorted(merged))
    out = Path(out_dir)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return out


# ---- checks ----------------------------------------------------------------------------------
def _check_args(merge: MergeMethod, count: int, weights: list[float] | None, density: float) -> list[float]:
    if count < 1:
        raise ValueError("combine needs at least one adapter")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} adapters; give one weight per adapter")
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries {merge.name} keeps), got {density!r}")
    return weights


def _common_base(dirs: list[Path], configs: list[dict[str, Any]]) -> str | None:
    """The base model every adapter names (adapters that name none are not compared)."""
    named = {str(d): c["base_model_name_or_path"] for d, c in zip(dirs, configs) if c.get("base_model_name_or_path")}
    if len(set(named.values())) > 1:
        which = "; ".join(f"{d} on {b}" for d, b in named.items())
        raise ValueError(f"the adapters were trained on different base models ({which}); "
                         "combine merges adapters of one base model")
    return next(iter(named.values()), None)


def _few(paths: list[str]) -> str:
    return ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def _align(per_adapter: list[dict[str, Pair]], labels: list[str], allow_partial: bool) -> dict[str, list[Pair]]:
    """path → one (A_i, B_i) per adapter; a layer an adapter lacks gets rank-0 factors (ΔW = 0)."""
    union = sorted(set().union(*per_adapter))
    lacking = {label: [p for p in union if p not in layers] for label, layers in zip(labels, per_adapter)}
    lacking = {label: paths for label, paths in lacking.items() if paths}
    if lacking and not allow_partial:
        detail = "; ".join(f"{label} lacks {_few(paths)}" for label, paths in lacking.items())
        raise ValueError(f"the adapters adapt different layers: {detail}. Pass allow_partial=True to treat a layer "
                         "an adapter lacks as a zero update for it")
    out = {}
    for path in union:
        shapes = {label: (layers[path][1].shape[0], layers[path][0].shape[1])
                  for label, layers in zip(labels, per_adapter) if path in layers}
        if len(set(shapes.values())) > 1:
            which = "; ".join(f"{list(s)} in {label}" for label, s in shapes.items())
            raise ValueError(f"layer {path} has different shapes ({which}): adapters of different base models?")
        rows, cols = next(iter(shapes.values()))
        empty = (torch.zeros(0, cols), torch.zeros(rows, 0))
        out[path] = [layers.get(path, empty) for layers in per_adapter]
    return out


def _target_rank(merge: MergeMethod, layers: dict[str, list[Pair]], rank: int | None) -> int:
    """The merged adapter's rank, checked against the method's bound and the smallest layer."""
    total = max(sum(a.shape[0] for a, _ in pairs) for pairs in layers.values())
    largest = max(a.shape[0] for pairs in layers.values() for a, _ in pairs)
    tight = min(layers, key=lambda p: min(layers[p][0][1].shape[0], layers[p][0][0].shape[1]))
    limit = min(layers[tight][0][1].shape[0], layers[tight][0][0].shape[1])
    shape = f"layer {tight} [{layers[tight][0][1].shape[0]}, {layers[tight][0][0].shape[1]}]"
    if merge.rank_bound == "none":
        if rank is not None:
            raise ValueError(f"{merge.name} is exact and keeps every component (rank Σ r_i = {total}), so it takes no "
                             "rank; use svd, ties, dare, magnitude-prune or lora-lego to choose one")
        if total > limit:
            raise ValueError(f"{merge.name} would give rank Σ r_i = {total}, more than {shape} allows ({limit}); "
                             f"use method='svd' with rank ≤ {limit}")
        return total
    if rank is None:
        return min(total if merge.default_rank == "sum" else largest, limit)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if merge.rank_bound == "sum" and rank > total:
        raise ValueError(f"rank {rank} is more than {merge.name} can fill: at most {total} (the sum of the adapters' "
                         "ranks)")
    if rank > limit:
        raise ValueError(f"rank {rank} exceeds what {shape} allows ({limit})")
    return rank


# ---- the merge -------------------------------------------------------------------------------
def _generator(seed: int, path: str) -> torch.Generator:
    """One generator per layer, so a layer's draws do not depend on which other layers exist."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{path}".encode()))


def _merge(per_adapter: list[dict[str, Pair]], labels: list[str], merge: MergeMethod, weights: list[float] | None,
           rank: int | None, density: float, seed: int, allow_partial: bool) -> tuple[dict[str, Pair], int]:
    """(path → merged (A, B), padded to one rank; that rank)."""
    weights = _check_args(merge, len(per_adapter), weights, density)
    weighted = [{p: (a, w * b) for p, (a, b) in layers.items()} for layers, w in zip(per_adapter, weights)]
    layers = _align(weighted, labels, allow_partial)
    width = _target_rank(merge, layers, rank)
    merged = {}
    for path, pairs in layers.items():
        a, b = merge.fn(pairs, MergeOptions(width, density, _generator(seed, path)))
        pad = width - a.shape[0]
        merged[path] = (torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], 1))
    return merged, width


# ---- live models -----------------------------------------------------------------------------
def _lora_family() -> list[str]:
    return [n for n, cls in METHODS.items() if issubclass(cls, LoRA) and cls.additive]


def _check_extras(spec: AdapterSpec, label: str) -> None:
    extras = [what for used, what in ((spec.modules_to_save, f"modules_to_save {spec.modules_to_save}"),
                                      (spec.bias != "none", f"bias={spec.bias!r}"),
                                      (spec.trainable_token_indices, "trainable token rows"),
                                      (spec.target_parameters, "LoRA on parameters (target_parameters)"),
                                      (spec.options.get("lora_bias"), "a bias on the update (lora_bias)"),
                                      (spec.layer_replication, "replicated blocks (layer_replication)")) if used]
    if extras:
        raise ValueError(f"adapter {label} also has {extras[0]}; combine merges only the low-rank factors of "
                         "layers, so it takes adapters without modules_to_save, token rows, target_parameters, "
                         "lora_bias or layer_replication, and with bias='none'")


def _model_factors(model: nn.Module, name: str, label: str) -> dict[str, Pair]:
    spec = get_spec(model, name)  # an unknown name fails with close matches
    _check_extras(spec, label)
    layers = {}
    for path, method in methods_of(model, name):
        if not (isinstance(method, LoRA) and method.additive):
            raise ValueError(f"adapter {label} is a {spec.method} adapter; combine merges LoRA-family adapters "
                             f"whose update is s·B·A ({', '.join(_lora_family())})")
        a, b, s = method.factors()
        layers[path] = (a.detach().float().cpu(), s * b.detach().float().cpu())
    return layers


def _combine_live(model: nn.Module, names: list[str], labels: list[str], method: str,
                  weights: list[float] | None, name: str, rank: int | None, density: float, seed: int,
                  allow_partial: bool) -> nn.Module:
    merge = MERGES.get(method)  # an unknown name fails with close matches
    per_adapter = [_model_factors(model, n, label) for n, label in zip(names, labels)]
    merged, width = _merge(per_adapter, labels, merge, weights, rank, density, seed, allow_partial)
    add_adapter(model, AdapterSpec(r=width, alpha=width, targets=sorted(merged)), name=name)
    with torch.no_grad():
        for path, m in methods_of(model, name):
            a, b = merged[path]
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
    return model


def _load_base(name_or_path: str | os.PathLike) -> nn.Module:
    from loralab import load_base

    return load_base(str(name_or_path))[0]


def _combine_through(model: nn.Module, dirs: list[Path], out_dir: str | os.PathLike, method: str,
                     weights: list[float] | None, rank: int | None, density: float, seed: int,
                     allow_partial: bool) -> Path:
    """Load the folders onto `model`, combine there, save, and take every adapter added here off again."""
    taken, active = set(adapter_names(model)), active_adapters(model)
    fresh = []
    for stem in [*(f"combine_input{i}" for i in range(len(dirs))), "combine_output"]:
        while stem in taken:
            stem += "_"
        fresh.append(stem)
    inputs, output = fresh[:-1], fresh[-1]
    try:
        for d, n in zip(dirs, inputs):
            load_adapter(model, d, name=n, activate=False)
        _combine_live(model, inputs, [str(d) for d in dirs], method, weights, output, rank, density, seed,
                      allow_partial)
        return save_adapter(model, out_dir, output)
    finally:
        for n in fresh:
            if n in adapter_names(model):
                remove_adapter(model, n)
        if active:
            set_active(model, active)


# ---- folders ---------------------------------------------------------------------------------
def _folder_factors(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Pair], dict[str, tuple], torch.dtype]:
    """(path → (A, s·B) canonical [r, in] / [out, r]; path → how its tensors are named and shaped; dtype)."""
    check_file_alone(config, "combine (from folders)")
    spec = spec_from_config(config)
    if spec.method != "lora":
        hint = (" Pass base=<the base model> to merge it through the model" if spec.method in _lora_family()
                else f" combine merges LoRA-family adapters ({', '.join(_lora_family())})")
        raise ValueError(f"{folder} holds a {spec.method} adapter; from files alone combine_folders reads plain LoRA "
                         f"(ΔW = s·B·A).{hint}")
    _check_extras(spec, str(folder))
    tensors = read_tensors(folder)
    layers, layouts, used = {}, {}, set()
    for key in tensors:
        for a_key, b_key in FACTOR_KEYS:
            path = key.removesuffix("." + a_key)
            if path != key and f"{path}.{b_key}" in tensors:
                a, b = tensors[key], tensors[f"{path}.{b_key}"]
                scale = spec.for_layer(path).scale
                layers[path] = (a.reshape(a.shape[0], -1).float(), scale * b.reshape(b.shape[0], -1).float())
                layouts[path] = (a_key, b_key, tuple(a.shape[1:]), tuple(b.shape[2:]))
                used |= {key, f"{path}.{b_key}"}
    others = sorted(set(tensors) - used)
    if others:
        raise ValueError(f"{folder} holds tensors other than LoRA factors ({_few(others)}); combine merges only "
                         "lora_A/lora_B pairs")
    if not layers:
        raise ValueError(f"{folder} holds no LoRA factors (lora_A/lora_B)")
    return layers, layouts, next(iter(tensors.values())).dtype


def _merged_config(configs: list[dict[str, Any]], base: str | None, rank: int, paths: list[str]) -> dict[str, Any]:
    """The first adapter's PEFT config with what the merge changed: rank, scale 1, the layers, no extras."""
    config = {**configs[0], "peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "lora_alpha": rank,
              "use_rslora": False, "use_dora": False, "target_modules": paths, "exclude_modules": None,
              "modules_to_save": None, "bias": "none", "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
              "layers_to_transform": None, "layers_pattern": None, "lora_dropout": 0.0,
              "task_type": next((c["task_type"] for c in configs if c.get("task_type")), None)}
    config.pop("loralab", None)
    return config
