"""LoRAMoE: a mixture of LoRA experts per layer with a token-level router (Dou et al., arXiv 2312.09979;
the MoE-LoRA family, e.g. MixLoRA arXiv 2404.15159).

For each token x, a trained router G (experts × in) scores the E experts, the top-k are kept
and softmax-weighted (top-1: weighted by its full-softmax probability, as in Switch
Transformer, so the router learns from the task loss), and the layer adds
Σ_{e∈top-k} g_e(x) · s·B_e A_e x. A Switch-style
load-balancing loss, E·Σ_e f_e·P_e (f_e: share of tokens routed to e, P_e: mean router
probability), weighted by option `balance`, is recorded for the trainer to add. The update
depends on x, so there is no single ΔW to merge: merging is refused. Options: experts, top_k,
balance. B starts at zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._routing import top_k_gates
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("loramoe")
class LoRAMoE(AdapterMethod):
    name = "loramoe"
    summary = "E LoRA experts per layer mixed per token by a trained top-k router, with a balance loss"
    paper = "2312.09979"
    param_formula = "E·r·(in + out) + E·in"
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"experts": 4, "top_k": 2, "balance": 0.01}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        e, k = self.options["experts"], self.options["top_k"]
        if not 1 <= k <= e:
            raise ValueError(f"loramoe top_k must be in [1, experts={e}], got {k}")
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.experts_A = nn.Parameter(torch.empty(e, spec.r, layer.in_features, **kw))
        self.experts_B = nn.Parameter(torch.zeros(e, layer.out_features, spec.r, **kw))
        self.router = nn.Parameter(torch.zeros(e, layer.in_features, **kw))
        bound = 1 / math.sqrt(layer.in_features)
        nn.init.uniform_(self.experts_A, -bound, bound)
        nn.init.normal_(self.router, std=bound)

    def expected_trainable_params(self) -> int:
        e = self.options["experts"]
        return e * self.r * (self.layer.in_features + self.layer.out_features) + e * self.layer.in_features

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, E] routing weights on each token's top-k experts, zero elsewhere (methods/_routing.py)."""
        logits = F.linear(x, self.router)
        gates = top_k_gates(logits, self.options["top_k"])
        if self.training and self.options["balance"]:
            probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
            share = (gates.reshape(-1, logits.shape[-1]) > 0).float().mean(0)
            self.aux_loss = self.options["balance"] * logits.shape[-1] * (share * probs.mean(0)).sum()
        return gates

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        gates = self.gates(x)  # [..., E]
        hidden = torch.einsum("...i,eri->...er", x, self.experts_A)
        out = torch.einsum("...er,eor->...eo", hidden, self.experts_B)
        return self.scale * torch.einsum("...e,...eo->...o", gates, out)

    def delta_weight(self) -> torch.Tensor:
        raise ValueError("loramoe's update depends on each token's routing: there is no single ΔW to merge "
                         "or analyse; keep it unmerged")
