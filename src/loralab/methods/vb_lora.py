"""VB-LoRA: extreme parameter-efficient fine-tuning with vector banks (Li et al., arXiv 2405.15179).

One bank of h vectors of length b is shared by every layer of the adapter. Each length-b
piece of each layer's A (r×in, split along in) and B (out×r, split along out) is a
top-k mixture of bank vectors, Σ_{j∈top-k} softmax(ℓ)_j · bank_j, with per-piece logits ℓ
trained: ΔW = s · B A. Bank (option `bank_size` h, `vector_length` b) and logits train;
as in the paper both start random (bank U(-0.02, 0.02), logits N(0, 0.1²), the bounds of
the authors' code), so ΔW is small but non-zero at the start. The paper uses b = 256; the
default `vector_length="auto"` takes the largest power of two up to 256 dividing every
adapted layer's in and out sizes (128 on MiniLM, 64 on SmolLM2), since a short b multiplies
the logits (h·r·(in + out)/b per layer) and slows learning.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec

DEFAULTS = {"bank_size": 256, "vector_length": "auto", "top_k": 2, "seed": 0, "bank_bound": 0.02,
            "logits_std": 0.1}


def vector_length(option: int | str, layers: list[LayerKind]) -> int:
    """b: the option, checked against every layer, or for "auto" the largest power of two ≤ 256 dividing them all."""
    sizes = {n for layer in layers for n in (layer.in_features, layer.out_features)}
    if option == "auto":
        return next(b for b in (256, 128, 64, 32, 16, 8, 4, 2, 1) if all(n % b == 0 for n in sizes))
    if not isinstance(option, int) or isinstance(option, bool) or option < 1:
        raise ValueError(f"vb-lora vector_length must be a positive integer or 'auto', got {option!r}")
    bad = sorted(n for n in sizes if n % option)
    if bad:
        raise ValueError(f"vb-lora vector_length={option} must divide every adapted layer's in and out sizes; "
                         f"it does not divide {bad} (use vector_length='auto')")
    return option


@METHODS.register("vb-lora")
class VBLoRA(FactoredMethod):
    name = "vb-lora"
    summary = "A and B assembled from top-k mixtures of one shared bank of short vectors"
    paper = "2405.15179"
    param_formula = "h·b shared, plus h·r·(in + out)/b logits per layer"
    suggested_lr = 5e-3
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = DEFAULTS

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        opts = {**DEFAULTS, **spec.options}
        g = torch.Generator().manual_seed(opts["seed"])
        b = vector_length(opts["vector_length"], layers)
        bank = (torch.rand(opts["bank_size"], b, generator=g) * 2 - 1) * opts["bank_bound"]
        shared = nn.Module()
        shared.bank = nn.Parameter(bank.to(layers[0].weight))
        return shared

    @classmethod
    def expected_shared_params(cls, spec: AdapterSpec, layers: list[LayerKind]) -> int:
        opts = {**DEFAULTS, **spec.options}
        return opts["bank_size"] * vector_length(opts["vector_length"], layers)

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        b, h, k = self.shared.bank.shape[1], self.options["bank_size"], self.options["top_k"]
        if not 1 <= k <= h:
            raise ValueError(f"vb-lora top_k must be in [1, bank_size={h}], got {k}")
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        std = self.options["logits_std"]
        self.logits_A = nn.Parameter(torch.randn(spec.r * layer.in_features // b, h, **kw) * std)
        self.logits_B = nn.Parameter(torch.randn(spec.r * layer.out_features // b, h, **kw) * std)

    def expected_trainable_params(self) -> int:
        return self.logits_A.numel() + self.logits_B.numel()

    def assemble(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row: the softmax-weighted sum of its top-k bank vectors."""
        top, index = logits.topk(self.options["top_k"], dim=-1)
        return torch.einsum("pk,pkb->pb", top.softmax(-1), self.shared.bank[index])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.assemble(self.logits_A).reshape(self.r, self.layer.in_features)
        b = self.assemble(self.logits_B).reshape(self.r, self.layer.out_features).T  # pieces run along out
        return a, b
