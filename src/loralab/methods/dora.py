"""DoRA: weight-decomposed LoRA, W' = m · (W + sBA) / ‖W + sBA‖_row (Liu et al., arXiv 2402.09353).

The magnitude m (one value per output row, initialised to ‖W‖_row) is trained alongside
LoRA's A and B (on an embedding, as in PEFT, one per embedding dimension, the norm taken over the
vocabulary: the table's columns). As in the paper (§4.3) the norm is treated as a constant in the backward
pass. It is computed without forming the out×in matrix W + sBA: with ‖W‖² cached per row
(W is frozen),
    ‖W + sBA‖² = ‖W‖² + 2s·rowsum((WAᵀ) ⊙ B) + s²·rowsum((B(AAᵀ)) ⊙ B).
W Aᵀ still reads every base weight once more — as much as the base product itself when a
forward is one token (generation) — so where no gradients are recorded (inference,
evaluation) the norms are kept until W, A, B or s change, as told by each tensor's storage
and in-place version counter: write parameters in place under `torch.no_grad()` or with
`load_state_dict`, not through `.data` (which no version counter sees). A forward that records
gradients computes them afresh and drops what was kept, since an optimiser may write the
factors past the version counters (through `.data` or a raw pointer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.fused_lora import LowRankTerms
from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.methods.lora import LoRA
from loralab.spec import AdapterSpec


@METHODS.register("dora")
class DoRA(LoRA):
    name = "dora"
    summary = "LoRA on the direction of W plus a trained per-row magnitude"
    paper = "2402.09353"
    param_formula = "r·(in + out) + out"
    peft_lora_field = "use_dora"
    additive = False
    needs_base = True
    layer_kinds = ("linear", "hf-conv1d", "conv", "embedding")

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        if spec.options.get("lora_bias"):
            raise ValueError("option lora_bias does not work with DoRA (as in PEFT)")
        super().__init__(layer, spec, shared)
        with torch.no_grad():
            self.magnitude = torch.nn.Parameter(self._weight_sq_norms().sqrt().to(layer.weight.dtype, copy=True))

    def expected_trainable_params(self) -> int:
        return super().expected_trainable_params() + self.layer.out_features

    def _weight_sq_norms(self) -> torch.Tensor:
        """‖W‖² per row, kept until the base weight changes (e.g. another adapter merges)."""
        w = self.layer.weight
        return self.keep("w_sq", (w,), lambda: self.layer.matrix(w.detach()).float().pow(2).sum(1))

    def row_norms(self) -> torch.Tensor:
        """‖W + sBA‖ per output row, a constant to autograd (kept where no gradients are recorded: see the
        module docstring)."""
        if torch.is_grad_enabled():
            self.forget("norms")
            return self._row_norms()
        return self.keep("norms", (self.layer.weight, self.lora_A, self.lora_B), self._row_norms, self.scale)

    @torch.no_grad()
    def _row_norms(self) -> torch.Tensor:
        a, b, s = self.lora_A.float(), self.lora_B.float(), self.scale
        w = self.layer.matrix(self.layer.weight.detach()).float()
        # 2s·rowsum((WAᵀ) ⊙ B) + s²·rowsum((B AAᵀ) ⊙ B) = 2s·rowsum((WAᵀ + (s/2)·B AAᵀ) ⊙ B)
        inner = torch.addmm(torch.mm(w, a.t()), b, torch.mm(a, a.t()), alpha=s / 2).mul_(b)
        return self._weight_sq_norms().add(inner.sum(1), alpha=2 * s).clamp_min_(0).sqrt_()

    def gain(self) -> torch.Tensor:
        """m / ‖W + sBA‖ per output row, divided in float32 and given in the magnitude's dtype."""
        return (self.magnitude.float() / self.row_norms()).to(self.magnitude.dtype)

    def _per_row(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (like.dim() - 2))) if self.layer.name == "conv" else v

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        x = self.drop(x)
        if self.dropout is not None and self.training and x.is_floating_point():
            base = self.layer.apply(x, self.layer.matrix())  # Wx on the same dropped input as BAx
        g = self._per_row(self.gain(), base)
        return (g - 1) * base + g * self.low_rank_out(x)

    add_to = AdapterMethod.add_to

    def apply_alone(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """g ⊙ (Wx + b + sBAx) + (1 − g) ⊙ b in two fused kernels (addmm, addcmul) for linear layers."""
        if self.layer.name in ("conv", "embedding") or (self.dropout is not None and self.training):
            return super().apply_alone(x, out)
        g = self.gain()
        h = F.linear(x, self.lora_A)
        t = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.T, alpha=self.scale)
        bias = self.layer.bias
        y = t * g if bias is None else torch.addcmul((1 - g) * bias, t, g)
        return y.view(out.shape)

    def fused_terms(self, x: torch.Tensor) -> LowRankTerms | None:
        """The apply_alone result with the base matmul inside the fused step (loralab.fused_lora)."""
        if self.dropout is not None and self.training:
            return None  # with dropout the base also sees the dropped input: the usual path does that
        a, b = self.lora_A, self.lora_B
        base = self.fused_base(x, a, b)
        return None if base is None else LowRankTerms(*base, a, b, self.scale, gain=self.gain())

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.matrix(self.layer.weight.detach())
        return self.merged_weight(w) - w

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        combined = weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)
        return (self.magnitude / combined.norm(dim=1)).unsqueeze(1).to(weight.dtype) * combined

    def to_saved(self) -> dict[str, torch.Tensor]:
        saved = super().to_saved()
        m = self.magnitude.detach()
        saved["lora_magnitude_vector"] = m.view(1, -1, *[1] * (self.layer.weight.dim() - 2)) if (
            self.layer.name == "conv") else m
        return saved
