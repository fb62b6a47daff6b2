"""MeteoRA-style gating: a trained per-token gate over adapters that are already trained and stay
frozen (Xu et al., arXiv 2405.13053, "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models").

In every layer that holds the named expert adapters, a router G (E × in) scores them for
each token; the layer adds Σ_{e∈top-k} g_e(x) · Δ_e(x), where Δ_e is expert e's own unmerged
change and g the softmax over the top-k logits (top-1: the chosen expert's full-softmax
probability, so the gate still learns; see methods/_routing.py). Only G trains. Build it with
`loralab.compose.add_router(model, experts)`
(or `AdapterSpec(method="meteora", options={"experts": [...]})` once the experts are attached);
save and load it like any adapter, after loading its experts under the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._routing import OverAdapters, top_k_gates
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


@METHODS.register("meteora")
class MeteoraGate(OverAdapters):
    name = "meteora"
    summary = "A trained per-token top-k gate mixing frozen, already-trained adapters"
    paper = "2405.13053"
    param_formula = "E·in (the gate only)"
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"experts": [], "top_k": 1}
    needs_base = True  # non-additive experts (DoRA, (IA)³) read the base output

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        experts, k = list(self.options["experts"]), self.options["top_k"]
        if not experts:
            raise ValueError("meteora needs options={'experts': [adapter names]}")
        if not 1 <= k <= len(experts):
            raise ValueError(f"meteora top_k must be in [1, {len(experts)}], got {k}")
        self.router = nn.Parameter(torch.zeros(len(experts), layer.in_features, dtype=layer.weight.dtype,
                                               device=layer.weight.device))

    def expected_trainable_params(self) -> int:
        return self.router.numel()

    def experts(self) -> list[AdapterMethod]:
        return self.adapters_named(self.options["experts"], "expert")

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.router)
        return top_k_gates(logits, self.options["top_k"])

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        gates = self.gates(x)
        changes = torch.stack([e.forward(x, base) for e in self.experts()], dim=-1)  # [..., out, E]
        return (changes * gates.unsqueeze(-2)).sum(-1)

    def delta_weight(self) -> torch.Tensor:
        raise ValueError("a meteora gate routes per token: there is no single ΔW to merge; keep it unmerged")
