"""Arrow: routing each token over a library of trained LoRA experts, with nothing trained (Ostapenko et al.,
arXiv 2405.11157, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"), and its GenKnowSub
refinement (Belofsky et al., ACL 2025, aclanthology 2025.acl-short.54), as HF PEFT's ArrowConfig computes them.

In each layer every expert e gets a prototype v_e, the top right singular vector of its ΔW_e = B_e A_e,
taken exactly from the small factors (QR of B, then the SVD of R·A; PEFT estimates it by power
iteration) and kept until the factors change. A token x scores |⟨v_e, x⟩| (a singular vector's sign is
arbitrary); its top-k experts are weighted by the softmax of those scores over the temperature, and the
layer adds Σ_e w_e · s_e · B_e A_e x. With `general` adapters (GenKnowSub), every expert routes and
computes with A_e − mean_g A_g and B_e − mean_g B_g, as PEFT subtracts them (here without changing the
experts, which still run as they were on their own). Build it with `loralab.compose.add_arrow(model,
experts)`; save and load it like any adapter, after loading its experts under the same names.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods._routing import OverAdapters
from loralab.methods.base import METHODS
from loralab.methods.lora import LoRA
from loralab.spec import AdapterSpec


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of B·A (A [r, in], B [out, r]) without forming it, in float32; zero where
    B·A is (an expert that changes nothing there scores no token, as in PEFT)."""
    _, rb = torch.linalg.qr(b.float())
    _, s, vh = torch.linalg.svd(rb @ a.float(), full_matrices=False)
    return vh[0] if s[0] > 0 else torch.zeros_like(vh[0])


@METHODS.register("arrow")
class ArrowRouter(OverAdapters):
    name = "arrow"
    summary = "Each token to its top-k LoRA experts by their ΔW's top singular vector; nothing trains"
    paper = "2405.11157"
    param_formula = "0 (it routes over the experts' own)"
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"experts": [], "top_k": 3, "temperature": 1.0, "general": []}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        experts, k, t = list(self.options["experts"]), self.options["top_k"], self.options["temperature"]
        if not experts:
            raise ValueError("arrow needs options={'experts': [adapter names]}")
        if not isinstance(k, int) or not 1 <= k <= len(experts):
            raise ValueError(f"arrow top_k must be an integer in [1, {len(experts)}], got {k!r}")
        if not isinstance(t, int | float) or t <= 0:
            raise ValueError(f"arrow temperature must be a positive number, got {t!r}")
        if spec.dropout:
            raise ValueError(f"arrow trains nothing, so dropout does not apply to it; got dropout={spec.dropout}")

    def expected_trainable_params(self) -> int:
        return 0

    def _lora(self, names: list[str], role: str) -> list[LoRA]:
        methods = self.adapters_named(names, role)
        other = [n for n, m in zip(names, methods) if type(m) is not LoRA]
        if other:
            raise ValueError(f"arrow routes over plain LoRA adapters; {other} are not (method 'lora' only)")
        return methods

    def factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[torch.Tensor]]:
        """Each expert's A, B and scale, GenKnowSub's mean of the general adapters subtracted where given, and
        the parameters they are formed from."""
        experts = self._lora(self.options["experts"], "expert")
        general = self._lora(self.options["general"], "general")
        sources = [p for m in [*experts, *general] for p in (m.lora_A, m.lora_B)]
        a_s = [e.lora_A for e in experts]
        b_s = [e.lora_B for e in experts]
        if general:
            shapes = {(tuple(m.lora_A.shape), tuple(m.lora_B.shape)) for m in [*experts, *general]}
            if len(shapes) > 1:
                raise ValueError(f"arrow's general-knowledge subtraction needs experts and general adapters of one "
                                 f"shape (one rank); got A, B shapes {sorted(shapes)}")
            mean_a = torch.stack([g.lora_A for g in general]).mean(0)
            mean_b = torch.stack([g.lora_B for g in general]).mean(0)
            a_s, b_s = [a - mean_a for a in a_s], [b - mean_b for b in b_s]
        return a_s, b_s, [e.scale for e in experts], sources

    def prototypes(self, a_s: list[torch.Tensor], b_s: list[torch.Tensor], sources: list[torch.Tensor]) -> torch.Tensor:
        """[E, in] the experts' top right singular vectors, kept until the parameters they come from change."""
        with torch.no_grad():
            return self.keep("prototypes", tuple(sources),
                             lambda: torch.stack([top_right_singular_vector(a, b) for a, b in zip(a_s, b_s)]))

    def gates(self, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """[..., E] each token's expert weights: a softmax over its top-k scores, zero elsewhere."""
        scores = (x @ prototypes.to(x.dtype).T).abs()
        top, index = scores.topk(self.options["top_k"], dim=-1)
        weights = (top / self.options["temperature"]).softmax(-1)
        return torch.zeros_like(scores).scatter(-1, index, weights)

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        a_s, b_s, scales, sources = self.factors()
        gates = self.gates(x, self.prototypes(a_s, b_s, sources))
        ranks = torch.tensor([a.shape[0] for a in a_s], device=x.device)
        weights = gates * torch.tensor(scales, dtype=gates.dtype, device=x.device)
        h = (x @ torch.cat(a_s).to(x.dtype).T) * weights.repeat_interleave(ranks, dim=-1)
        return h @ torch.cat(b_s, dim=1).to(x.dtype).T

    def delta_weight(self) -> torch.Tensor:
        raise ValueError("an arrow router routes per token: there is no single ΔW to merge; keep it unmerged")
