"""LoRA: ΔW = (alpha / r) · B A with A ∈ R^{r×in}, B ∈ R^{out×r} (Hu et al., arXiv 2106.09685).

rsLoRA (Kalajdzievski, arXiv 2312.03732) is the same method with scale alpha / sqrt(r)
(`AdapterSpec(rslora=True)`). Option `lora_bias` (PEFT's): the update has a trained bias too,
s·(BAx + b), which merging adds to the layer's bias (a layer without one cannot merge it). Option
`alora_invocation_tokens` (PEFT's): activated LoRA, the update only from those tokens on
(loralab.activated_lora).
The unmerged path never forms ΔW. On a linear layer where it
is the only active adapter, the base matmul and the update run as one autograd step
(`loralab.fused_lora`: the update added in place, one input gradient); otherwise it is two
thin matmuls with the scale and the add fused into one `addmm`. B is kept as the transpose of a
contiguous [r, out] (`fused_lora.b_factor_layout`), whose gradient the fused step computes fastest.
Convolutions apply A as a kernel and B as a 1×1 convolution; embeddings look rows of Aᵀ up and
multiply by Bᵀ.
Variants that only change `factors()` (DyLoRA, SoRA, …) keep the fused path.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralab.activated_lora import Activation, activation_mask, check_tokens
from loralab.fused_lora import LowRankTerms, b_factor_layout
from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("lora")
class LoRA(AdapterMethod):
    _fusable = True
    name = "lora"
    summary = "Low-rank update ΔW = s·BA; B starts at zero"
    paper = "2106.09685"
    param_formula = "r·(in + out)"
    peft_type = "LORA"
    layer_kinds = (*AdapterMethod.layer_kinds, "mha")
    option_defaults = {"lora_bias": False, "alora_invocation_tokens": None}

    # Overriding any of these changes what the layer computes, so a subclass that does loses the fused path.
    _FORWARD = ("drop", "delta", "low_rank_out", "forward", "add_to", "apply_alone")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._fusable = all(getattr(cls, n) is getattr(LoRA, n) for n in LoRA._FORWARD)

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        w = layer.weight
        self.lora_A = nn.Parameter(torch.empty(spec.r, layer.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(b_factor_layout(torch.zeros(layer.out_features, spec.r, dtype=w.dtype,
                                                               device=w.device)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_bias: nn.Parameter | None = None
        if self.options["lora_bias"]:
            if layer.name in ("embedding", "mha"):
                raise ValueError(f"option lora_bias (a trained bias on the update) does not apply to {layer.name} "
                                 "layers, as in PEFT")
            self.lora_bias = nn.Parameter(torch.zeros(layer.out_features, dtype=w.dtype, device=w.device))
        self.invocation: list[int] | None = None
        self.activation: Activation | None = None  # its rows' offsets in the model's forward (see add_adapter)
        if self.options["alora_invocation_tokens"] is not None:
            self.invocation = check_tokens(self.options["alora_invocation_tokens"])
            if type(self) is not LoRA or layer.name not in ("linear", "hf-conv1d"):
                raise ValueError(f"option alora_invocation_tokens (activated LoRA) takes method 'lora' on linear "
                                 f"layers, as in PEFT; got method {self.name!r} on a {layer.name} layer")

    def expected_trainable_params(self) -> int:
        bias = 0 if self.lora_bias is None else self.layer.out_features
        return self.r * (self.layer.in_features + self.layer.out_features) + bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) as the forward uses them; variants (DyLoRA, SoRA) truncate or gate here."""
        return self.lora_A, self.lora_B, self.scale

    def delta_weight(self) -> torch.Tensor:
        a, b, s = self.factors()
        return s * (b @ a)

    def low_rank_out(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x through the rank-r bottleneck (x already passed through dropout)."""
        a, b, s = self.factors()
        kind = self.layer.name
        if kind == "embedding":
            return self.layer.lookup(x, a.T) @ b.T * s
        if kind == "conv":
            h = self.layer.conv_kernel(x, a.reshape(a.shape[0], *self.layer.weight.shape[1:]))
            out = self.layer.conv(h, b.reshape(*b.shape, *([1] * (h.dim() - 2))))
            if self.lora_bias is not None:
                out = out + self.lora_bias.view(-1, *([1] * (out.dim() - 2)))
            return out * s
        return F.linear(F.linear(x, a), b, self.lora_bias) * s

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # embeddings take indices: no dropout on them
        return self.low_rank_out(x if self.layer.name == "embedding" else self.drop(x))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if self.layer.name in ("embedding", "conv"):
            return out + self.delta(x)
        if self.invocation is not None:
            return out + self._activated(self.delta(x))
        a, b, s = self.factors()
        h = F.linear(self.drop(x), a)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, a.shape[0]), b.T, alpha=s)
        if self.lora_bias is not None:
            flat.add_(self.lora_bias, alpha=s)
        return flat.view(out.shape)

    def fused_base(self, x: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W [out, in], bias) where `loralab.fused_lora` may compute this layer, else None: a plain
        linear layer (see LayerKind.runs_plain) with a frozen base (a base trained alongside needs its
        own gradient) and one dtype throughout unless autocast casts."""
        layer = self.layer
        if layer.name not in ("linear", "hf-conv1d") or not x.is_floating_point() or not layer.runs_plain():
            return None
        w, bias = layer.weight, layer.bias
        if w.requires_grad or (bias is not None and bias.requires_grad):
            return None
        if x.dtype == w.dtype == a.dtype == b.dtype or torch.is_autocast_enabled(x.device.type):
            return layer.matrix(w), bias
        return None

    def _activated(self, delta: torch.Tensor) -> torch.Tensor:
        """The update where each row's invocation has begun (none before the model's first forward)."""
        offsets = None if self.activation is None else self.activation.offsets
        if offsets is None:
            return delta * 0  # the base alone, and gradients of zero, as in PEFT
        if self.batch_rows is not None:  # a mixed-adapter batch: this adapter's rows
            offsets = offsets.to(self.batch_rows.device)[self.batch_rows]
        if offsets.shape[0] != delta.shape[0]:
            raise RuntimeError(f"activated LoRA found its invocation in {offsets.shape[0]} rows but this layer has "
                               f"{delta.shape[0]}: a layer called on other inputs than the model's rows")
        return delta * activation_mask(offsets, delta)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.invocation is not None:
            raise RuntimeError("an activated LoRA (alora_invocation_tokens) cannot be merged, nor read as one weight "
                               "(as in PEFT): it changes only the tokens from its invocation on")
        if self.lora_bias is not None and self.layer.bias is None:
            raise RuntimeError("an adapter with lora_bias cannot be merged into a layer without a bias, nor read as "
                               "one weight (as in PEFT): its bias has nowhere to go")
        return super().merged_weight(weight)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor | None:
        return None if self.lora_bias is None else bias + self.scale * self.lora_bias.to(bias.dtype)

    def fused_terms(self, x: torch.Tensor) -> LowRankTerms | None:
        if not self._fusable or self.lora_bias is not None or self.invocation is not None:
            return None
        a, b, s = self.factors()
        base = self.fused_base(x, a, b)
        if base is None:
            return None
        return LowRankTerms(*base, a, b, s, dropout=self.dropout if self.training else None)

    @classmethod
    def remap_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # PEFT's VeLoRA changes only how A's gradient is formed in training (from compressed inputs), not the
        # forward: its projection buffer is not needed (loralab trains such an adapter on with exact gradients).
        # MonteCLoRA samples perturbations of A in training only, from its sampler's variational parameters;
        # outside training (and merged) it is the plain LoRA its factors give.
        training_only = [part for field, part in (("velora_config", ".lora_velora_embed"),
                                                  ("monteclora_config", ".lora_monteclora_sampler."))
                         if config.get(field)]
        if config.get("monteclora_config"):
            warnings.warn("a MonteCLoRA adapter: loralab computes what PEFT computes outside training, the plain "
                          "LoRA of its factors; its training-time sampling is not implemented (training it on "
                          "trains a plain LoRA)", stacklevel=4)
        return {k: v for k, v in tensors.items() if not any(part in k for part in training_only)}

    # PEFT names: lora_A.weight / lora_B.weight (conv: kernel shapes), lora_embedding_A / _B.
    def to_saved(self) -> dict[str, torch.Tensor]:
        saved = self.factor_tensors(self.lora_A.detach(), self.lora_B.detach())
        if self.lora_bias is not None:
            saved["lora_B.bias"] = self.lora_bias.detach()
        return saved

    def factor_tensors(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Canonical factors A [r, in], B [out, r] under PEFT's key names and shapes for this layer."""
        if self.layer.name == "embedding":
            return {"lora_embedding_A": a, "lora_embedding_B": b}
        if self.layer.name == "conv":
            k = self.layer.weight.shape[2:]
            return {"lora_A.weight": a.view(a.shape[0], -1, *k), "lora_B.weight": b.view(*b.shape, *[1] * len(k))}
        return {"lora_A.weight": a, "lora_B.weight": b}
