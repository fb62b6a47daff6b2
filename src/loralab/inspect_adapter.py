"""What is in an adapter folder, without loading a base model: config, sizes, per-layer norms."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from loralab.checkpoint import read_config, read_tensors, spec_from_config
from loralab.peft_lora_fields import changes_base


@dataclass
class LayerSummary:
    module: str
    tensors: dict[str, list[int]]
    params: int
    delta_norm: float | None  # ‖s·BA‖_F of LoRA-family factors (DoRA: before its magnitude; SoRA, KaSA:
    # s·B·diag(d)·A with their gate or Δσ, KaSA's filtered part not being in the file), else None
    tensor_norm: float  # ‖all of this layer's adapter tensors‖


@dataclass
class AdapterSummary:
    path: str
    config: dict[str, Any]
    method: str
    params: int
    layers: list[LayerSummary] = field(default_factory=list)
    r: int = 0
    alpha: float = 0.0  # as the method reads it, whatever the config's field for it is called
    rslora: bool = False
    notes: list[str] = field(default_factory=list)  # what the figures do not say
    tokens: list[int] | dict[str, list[int]] | None = None  # trainable token rows (ids, or module → ids)

    @property
    def tokens_only(self) -> bool:
        """Token rows and nothing else (PEFT's TRAINABLE_TOKENS): no rank or scale to speak of."""
        return self.config.get("peft_type") == "TRAINABLE_TOKENS"


RANK_DIAGONALS = ("lora_gate", "lora_diag")  # SoRA's gate, KaSA's Δσ: ΔW = s·B·diag(d)·A


def gated_b(b: torch.Tensor, own: dict[str, torch.Tensor]) -> torch.Tensor:
    """B [out, r] with its columns scaled by the layer's rank-r diagonal, where the file holds one."""
    d = next((own[k] for k in RANK_DIAGONALS if k in own), None)
    return b if d is None else b * d.reshape(1, -1).to(b.dtype)


def lora_delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """‖s·BA‖_F from the factors: sqrt(trace((BᵀB)(AAᵀ))), no out×in product formed."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return float(scale * torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0).sqrt())


def expert_delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int) -> float:
    """‖ΔW‖_F over a stack of experts held as PEFT's target_parameters holds them (loralab.param_targets):
    expert e's A is rows e·r … e·r + r − 1 of A, its B the columns e, E + e, … of B."""
    a_e = a.reshape(experts, -1, a.shape[-1])
    b_e = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return sum(lora_delta_norm(x, y, scale) ** 2 for x, y in zip(a_e, b_e)) ** 0.5


def summarize(path: str | os.PathLike) -> AdapterSummary:
    config = read_config(path)
    spec = spec_from_config(config)
    tensors = read_tensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        for marker in (".lora_", ".base_layer.", ".token_adapter."):
            if marker in key:
                module, _, rest = key.partition(marker)
                groups[module][marker.strip(".") + rest] = t
                break
        else:
            module, _, leaf = key.rpartition(".")
            groups[module][leaf] = t
    layers = []
    for module, own in sorted(groups.items()):
        a = own.get("lora_A.weight", own.get("lora_embedding_A"))
        b = own.get("lora_B.weight", own.get("lora_embedding_B"))
        layer_spec = spec.for_layer(module)
        experts = a.shape[0] // layer_spec.r if (
            spec.target_parameters and a is not None and a.dim() == 2 and a.shape[0] % layer_spec.r == 0) else 1
        if a is None or b is None:
            delta = None
        elif experts > 1:
            delta = expert_delta_norm(a, b, layer_spec.scale, experts)
        else:
            delta = lora_delta_norm(a, gated_b(b.reshape(b.shape[0], -1), own), layer_spec.scale)
        flat = torch.cat([t.float().flatten() for t in own.values()])
        layers.append(LayerSummary(module, {k: list(t.shape) for k, t in own.items()}, flat.numel(), delta,
                                   float(flat.norm())))
    notes = []
    if changes_base(config):
        notes.append(f"saved by PEFT with init_lora_weights={config['init_lora_weights']!r} and not converted: "
                     "s·BA is the change from a base that init changed, not from the original base "
                     "(loading it re-forms that base; saving it from loralab converts it)")
    if spec.target_parameters:
        notes.append(f"target_parameters {spec.target_parameters}: a module's targeted parameters are listed under "
                     "its path, and its earlier ones under .base_layer (PEFT nests one wrapper per parameter, in the "
                     "module's order); |s·BA|_F of an expert stack is over all its experts")
    return AdapterSummary(str(path), config, spec.method, sum(t.numel() for t in tensors.values()), layers,
                          spec.r, spec.alpha, spec.rslora, notes, spec.trainable_token_indices)
