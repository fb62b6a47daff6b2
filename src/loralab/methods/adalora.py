"""AdaLoRA's SVD-form adapter (Zhang et al., arXiv 2303.10512): ΔW = s · P diag(λ ⊙ m) Q.

P ∈ R^{out×r} and Q ∈ R^{r×in} are kept near-orthogonal by a regulariser, λ ∈ R^r holds the
"singular values" (zero at init, so the output starts unchanged) and m is a 0/1 mask that
rank schedules (`rank_schedule="adalora"` prunes, `"increlora"` grows) set per triplet.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("adalora")
class AdaLoRA(AdapterMethod):
    name = "adalora"
    summary = "SVD-form update P·diag(λ)·Q whose rank a schedule prunes or grows by importance"
    paper = "2303.10512"
    suggested_lr = 5e-3
    rank_schedule = "adalora"
    param_formula = "r·(in + out) + r"
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
