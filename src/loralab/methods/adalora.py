"""AdaLoRA's SVD-form adapter (Zhang et al., arXiv 2303.10512): ΔW = s · P diag(λ ⊙ m) Q.

P ∈ R^{out×r} and Q ∈ R^{r×in} are kept near-orthogonal by a regulariser, λ ∈ R^r holds the
"singular values" (zero at init, so the output starts unchanged) and m is a 0/1 mask that
rank schedules (`rank_schedule="adalora"` prunes, `"increlora"` grows) set per triplet.

Saved in PEFT's AdaLoRA format: `lora_A` [k, in] holds Q, `lora_B` [out, k] P and `lora_E` [k, 1] λ for
the k ≤ r triplets the mask keeps; `init_r` is r. PEFT scales by lora_alpha / (ranknum + 1e-5), ranknum = init_r, so
loralab writes lora_alpha = s·(r + 1e-5) and reads s = lora_alpha / (init_r + 1e-5) (an rsLoRA scale too:
PEFT's AdaLoRA ignores use_rslora). PEFT's schedule fields (target_r, tinit, tfinal, deltaT, beta1, beta2,
orth_reg_weight, total_step) configure its RankAllocator, not the adapter, and loralab's schedule takes its
own from TrainConfig.rank_options: they are written as PEFT's defaults (but target_r = r // 2, loralab's
default target_rank, as PEFT's 8 may exceed r, and total_step, which PEFT requires, = 1) and ignored on
reading.
Masks: as PEFT does, a layer's file holds only the triplets its mask keeps, and where any layer is pruned
the config's `rank_pattern` gives every layer's mask (booleans over the init_r slots, keyed
`<module path>.lora_E`). Read back (loralab's files or PEFT's), the kept triplets come first in the layer
and the rest are masked with a fresh start (their order does not change the output; IncreLoRA grows
masks from the front): a masked triplet's P, Q and λ are not kept. Files of loralab's old layout
(`lora_P`, `lora_Q`, `lora_E` [r], `rank_mask`; peft_type LORALAB) are read too, masks included.
PEFT's AdaLoRA takes nn.Linear, GPT-2's Conv1D and nn.Conv2d: an AdaLoRA on nn.Embedding, nn.Conv1d or
nn.Conv3d is read by loralab alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, check_shape
from loralab.spec import AdapterSpec

PEFT_RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@METHODS.register("adalora")
class AdaLoRA(AdapterMethod):
    name = "adalora"
    summary = "SVD-form update P·diag(λ)·Q whose rank a schedule prunes or grows by importance"
    paper = "2303.10512"
    suggested_lr = 5e-3
    rank_schedule = "adalora"
    param_formula = "r·(in + out) + r"
    peft_type = "ADALORA"
    option_defaults = {"init_rank": None}  # triplets active at the start (default: all r)

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        w = layer.weight
        kw = {"dtype": w.dtype, "device": w.device}
        # orthonormal P and Q, as singular vectors are: the orthogonality regulariser starts at zero
        # and does not swamp the task gradient under clipping (λ = 0 keeps the output unchanged)
        self.lora_P = nn.Parameter(torch.linalg.qr(torch.randn(layer.out_features, spec.r))[0].to(**kw))
        self.lora_Q = nn.Parameter(torch.linalg.qr(torch.randn(layer.in_features, spec.r))[0].T.contiguous().to(**kw))
        self.lora_E = nn.Parameter(torch.zeros(spec.r, **kw))
        start = self.options["init_rank"] or spec.r
        self.register_buffer("rank_mask", (torch.arange(spec.r) < start).to(w.dtype).to(w.device))

    def expected_trainable_params(self) -> int:
        return self.r * (self.layer.in_features + self.layer.out_features) + self.r

    def values(self) -> torch.Tensor:
        return self.lora_E * self.rank_mask

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_P * self.values()) @ self.lora_Q

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.name != "linear" and self.layer.name != "hf-conv1d":
            return super().delta(x)
        h = nn.functional.linear(self.drop(x), self.lora_Q) * self.values()
        return nn.functional.linear(h, self.lora_P) * self.scale

    def orthogonality_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """∂/∂P, ∂/∂Q of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F, the paper's regulariser."""
        eye = torch.eye(self.r, dtype=self.lora_P.dtype, device=self.lora_P.device)
        p, q = self.lora_P.detach(), self.lora_Q.detach()
        return 4 * p @ (p.T @ p - eye), 4 * (q @ q.T - eye) @ q

    def active_rank(self) -> int:
        return int(self.rank_mask.sum())

    # ---- PEFT's AdaLoRA format -------------------------------------------------------------
    def kept(self) -> list[bool]:
        """Which triplets the mask keeps, as PEFT's rank_pattern lists them."""
        return self.rank_mask.bool().tolist()

    def to_saved(self) -> dict[str, torch.Tensor]:
        """The kept triplets only, as PEFT saves a pruned layer (with every one kept: all r)."""
        keep = self.rank_mask.bool()
        q, p, e = self.lora_Q.detach(), self.lora_P.detach(), self.lora_E.detach()
        return {"lora_A": q[keep], "lora_B": p[:, keep], "lora_E": e[keep, None]}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Reads PEFT's layout, whose k ≤ r triplets (k < r after PEFT's pruning) fill the first k slots, or
        loralab's old one."""
        if "lora_P" in tensors:  # loralab's layout before PEFT's
            targets = {"lora_P": self.lora_P, "lora_Q": self.lora_Q, "lora_E": self.lora_E, "rank_mask": self.rank_mask}
            _copy(targets, tensors, where)
            return
        k = tensors["lora_E"].shape[0] if "lora_E" in tensors else self.r
        if k > self.r:
            raise ValueError(f"{where}.lora_E holds {k} triplets but the config's init_r is {self.r}")
        targets = {"lora_A": self.lora_Q[:k], "lora_B": self.lora_P[:, :k], "lora_E": self.lora_E[:k, None]}
        _copy(targets, tensors, where)
        with torch.no_grad():  # the other triplets keep their fresh start (λ = 0), masked
            self.rank_mask.copy_(torch.arange(self.r) < k)

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        if any((m.r, m.scale) != (spec.r, spec.scale) for m in adapted.values()):
            return None  # PEFT's AdaLoRA has one init_r and lora_alpha (its rank_pattern holds masks)
        masks = {f"{path}.lora_E": method.kept() for path, method in adapted.items()}
        pruned = any(not all(kept) for kept in masks.values())
        return {"peft_type": "ADALORA", "init_r": spec.r, "lora_alpha": spec.scale * (spec.r + PEFT_RANKNUM_EPS),
                "lora_dropout": spec.dropout, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                "rank_pattern": masks if pruned else None, "target_r": max(1, spec.r // 2), "tinit": 0, "tfinal": 0,
                "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 1}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        r, alpha = int(config.get("init_r", 12)), float(config.get("lora_alpha", 8))
        if alpha <= 0:  # PEFT then scales a layer by its own rank: init_r, or what rank_pattern keeps
            if any(0 < sum(kept) < r for kept in (config.get("rank_pattern") or {}).values()):
                raise ValueError(f"this AdaLoRA adapter has lora_alpha={alpha:g} and a rank_pattern that prunes "
                                 "some layers, so PEFT scales each layer by its pruned rank; loralab has one scale "
                                 "per adapter and reads lora_alpha <= 0 only with every layer at rank init_r or 0")
            alpha = r
        return {"method": "adalora", "r": r, "alpha": alpha * r / (r + PEFT_RANKNUM_EPS),
                "dropout": float(config.get("lora_dropout") or 0), "bias": config.get("bias") or "none"}


def _copy(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy tensors[key] into each target, once every key is there with the target's shape."""
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise ValueError(f"adapter file lacks {', '.join(f'{where}.{k}' for k in missing)}")
    for key, target in targets.items():
        check_shape(f"{where}.{key}", tensors[key].shape, target.shape)
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key])
