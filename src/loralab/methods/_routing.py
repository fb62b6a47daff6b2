"""Top-k token routing shared by the mixture methods (LoRAMoE, MeteoRA-style gates), and the base of the
routers that compute with other adapters of their layer (MeteoRA's gate, Arrow).

k > 1: softmax over each token's k best logits (Mixtral-style, as MeteoRA and LoRAMoE weight
their experts). k = 1: the chosen expert is weighted by its probability under the softmax
over all experts, as in Switch Transformer (arXiv 2101.03961); a softmax over one logit is
always 1, which would leave the router without any gradient from the task loss.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import AdapterMethod
from loralab.spec import AdapterSpec


def top_k_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[..., E] expert weights: non-zero on each token's top-k experts only."""
    top, index = logits.topk(k, dim=-1)
    weights = top.softmax(-1) if k > 1 else logits.softmax(-1).gather(-1, index)
    return torch.zeros_like(logits).scatter(-1, index, weights)


class OverAdapters(AdapterMethod):
    """A router whose layer change is computed by other adapters of the same layer, named in its options."""

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.host: nn.Module | None = None

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r is unused

    def attach(self, host: nn.Module) -> None:
        object.__setattr__(self, "host", host)  # a reference, not a submodule: the experts stay theirs

    def adapters_named(self, names: list[str], role: str) -> list[AdapterMethod]:
        """The layer's adapters `names`; raises naming those it lacks."""
        missing = [n for n in names if self.host is None or n not in self.host.adapters]
        if missing:
            raise ValueError(f"{self.name}: {role} adapter(s) {missing} are not attached to this layer")
        return [self.host.adapters[n] for n in names]
