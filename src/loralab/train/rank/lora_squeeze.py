"""LoRA-Squeeze: train at a generous rank, then compress the adapter to rank k by SVD of ΔW —
after training (`squeeze_adapter`, `loralab squeeze`) or during it (the `lora-squeeze` rank
schedule, option `at`: the step at which to squeeze, `rank`: k).

The SVD never forms ΔW: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), s·BA = Q_B (s·R_B R_Aᵀ) Q_Aᵀ,
so the SVD of the r×r core gives ΔW's exact singular triplets; keeping the top k is the best
rank-k approximation (Eckart–Young). This is cheaper and more exact than a randomised SVD of
the dense ΔW, which is what one would use without the factors.
"""

from __future__ import annotations

import json
import os
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
    read_config,
    read_tensors,
    spec_from_config,
)
from loralab.model import state_of
from loralab.peft_lora_fields import check_file_alone
from loralab.rank_pattern import set_factors
from loralab.spec import AdapterSpec
from loralab.train.rank import RANK_SCHEDULES, RankSchedule, check_options, methods_named


def truncate_factors(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_k, B_k) with B_k A_k the best rank-k approximation of scale·B·A (no scale left over)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(scale * rb @ ra.T)
    root = s[:rank].sqrt()
    new_b = qb @ (u[:, :rank] * root)
    new_a = (root[:, None] * vh[:rank]) @ qa.T
    return new_a.to(a.dtype), new_b.to(b.dtype)


def squeeze_adapter(path: str | os.PathLike, rank: int, out_dir: str | os.PathLike) -> Path:
    """Write a rank-`rank` copy of a LoRA/DoRA adapter folder (PEFT format) into out_dir."""
    config = read_config(path)
    check_file_alone(config, "squeeze")
    spec = spec_from_config(config)
    if spec.method not in ("lora", "dora"):
        raise ValueError(f"squeeze works on LoRA and DoRA adapters, not {spec.method!r}")
    tensors = read_tensors(path)
    smallest = min((t.shape[0] for k, t in tensors.items() if k.endswith(("lora_A.weight", "lora_embedding_A"))),
                   default=spec.r)  # with rank_pattern a layer may hold fewer than r
    if not 1 <= rank <= smallest:
        raise ValueError(f"rank must be in [1, {smallest}] to squeeze (the adapter's smallest layer rank), got {rank}")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith("lora_A.weight") or key.endswith("lora_embedding_A"):
            continue
        if key.endswith("lora_B.weight") or key.endswith("lora_embedding_B"):
            stem = key[: -len("lora_B.weight")] if key.endswith(".weight") else key[: -len("lora_embedding_B")]
            a_key = stem + ("lora_A.weight" if key.endswith(".weight") else "lora_embedding_A")
            a = tensors[a_key]
            scale = spec.for_layer(stem.removesuffix(".")).scale
            new_a, new_b = truncate_factors(a.reshape(a.shape[0], -1), t.reshape(t.shape[0], -1), scale, rank)
            out[PREFIX + a_key] = new_a.reshape(rank, *a.shape[1:]).contiguous()
            out[PREFIX + key] = new_b.reshape(t.shape[0], rank, *t.shape[2:]).contiguous()
        else:
            out[PREFIX + key] = t
    config = {**config, "r": rank, "lora_alpha": rank, "use_rslora": False,  # the scale now lives in the factors
              "rank_pattern": {}, "alpha_pattern": {}}
    target = Path(out_dir)
    atomic_write(target / WEIGHTS_FILE, lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    atomic_write(target / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return target


@torch.no_grad()
def squeeze_method(method: nn.Module, rank: int) -> None:
    """Replace a live LoRA method's factors by their rank-k truncation (new, smaller parameters)."""
    new_a, new_b = truncate_factors(method.lora_A, method.lora_B, method.scale, rank)
    set_factors(method, new_a, new_b, scale=1.0)  # the scale is carried by the new factors


@RANK_SCHEDULES.register("lora-squeeze")
class LoRASqueezeSchedule(RankSchedule):
    def __init__(self, model: nn.Module, config: Any) -> None:
        self.options = check_options(config.rank_options, {"rank": None, "at": None}, "lora-squeeze")
        self.model = model
        self.methods = methods_named(model, "lora", "lora-squeeze")
        self.squeezed = False
        r = self.methods[0].r
        self.rank = self.options["rank"] or max(1, r // 2)
        if not 1 <= self.rank <= r:
            raise ValueError(f"lora-squeeze rank must be in [1, r={r}], got {self.rank}")
        self.at = self.options["at"] if self.options["at"] is not None else config.max_steps // 2

    def on_step_end(self, trainer: Any, step: int, logs: dict) -> None:
        if step != self.at:
            return
        self._squeeze()
        trainer.rebuild_optimizer()
        logs["squeezed_to"] = self.rank

    def _squeeze(self) -> None:
        for m in self.methods:
            squeeze_method(m, self.rank)
        specs = state_of(self.model).specs
        for name, spec in specs.items():
            if spec.method == "lora":
                specs[name] = AdapterSpec(**{**spec.to_dict(), "r": self.rank, "alpha": self.rank, "rslora": False})
        self.squeezed = True

    def state_dict(self) -> dict[str, Any]:
        return {"squeezed": self.squeezed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint taken after the squeeze holds rank-k factors: squeeze first so they fit."""
        if state["squeezed"] and not self.squeezed:
            self._squeeze()
