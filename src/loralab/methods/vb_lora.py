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

Saved in PEFT's VBLORA format (nn.Linear and GPT-2's Conv1D, the layers PEFT's VB-LoRA takes):
`base_model.vblora_vector_bank` [h, b] and per layer `vblora_logits_A` [r, in/b, h] (piece j of
row i of A: logits_A[i, j]) and `vblora_logits_B` [out/b, r, h] (piece j of column i of B:
logits_B[j, i]), the layout loralab keeps them in too. PEFT's ΔW = B A has no scale: loralab
saves √s·bank (ΔW is quadratic in the bank), so an adapter read back has s = 1 (alpha = r) and
the same output, up to rounding. Files PEFT wrote with `save_only_topk_weights` (top-k indices
and weights in place of the logits) read as PEFT reads them, the other logits −∞: such an
adapter keeps its choice of bank vectors if trained further. Files of loralab's older layout
("peft_type": "LORALAB"; `logits_A` [r·in/b, h], `logits_B` [r·out/b, h], the bank under
`base_model.model.loralab_shared.bank`) still load.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, FactoredMethod
from loralab.spec import AdapterSpec

DEFAULTS = {"bank_size": 256, "vector_length": "auto", "top_k": 2, "seed": 0, "bank_bound": 0.02,
            "logits_std": 0.1}
BANK = "base_model.vblora_vector_bank"  # the bank's key in the file, as `read_tensors` leaves it
INDICES, WEIGHTS = "_topk_indices", "_topk_weights"  # PEFT's save_only_topk_weights keys: <logits> + these


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


def logits_from_topk(indices: torch.Tensor, weights: torch.Tensor, bank_size: int) -> torch.Tensor:
    """Full logits from PEFT's top-k indices and the first k − 1 softmax weights: log-weights, −∞ elsewhere."""
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    full = torch.full((*indices.shape[:-1], bank_size), -math.inf, dtype=weights.dtype)
    return full.scatter(-1, indices.long(), weights.log())


@METHODS.register("vb-lora")
class VBLoRA(FactoredMethod):
    name = "vb-lora"
    summary = "A and B assembled from top-k mixtures of one shared bank of short vectors"
    paper = "2405.15179"
    param_formula = "h·b shared, plus h·r·(in + out)/b logits per layer"
    peft_type = "VBLORA"
    shared_prefix = "base_model."
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
        shared.vblora_vector_bank = nn.Parameter(bank.to(layers[0].weight))
        return shared

    @classmethod
    def expected_shared_params(cls, spec: AdapterSpec, layers: list[LayerKind]) -> int:
        opts = {**DEFAULTS, **spec.options}
        return opts["bank_size"] * vector_length(opts["vector_length"], layers)

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        b, h, k = self.shared.vblora_vector_bank.shape[1], self.options["bank_size"], self.options["top_k"]
        if not 1 <= k <= h:
            raise ValueError(f"vb-lora top_k must be in [1, bank_size={h}], got {k}")
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        std = self.options["logits_std"]
        self.vblora_logits_A = nn.Parameter(torch.randn(spec.r, layer.in_features // b, h, **kw) * std)
        self.vblora_logits_B = nn.Parameter(torch.randn(layer.out_features // b, spec.r, h, **kw) * std)

    def expected_trainable_params(self) -> int:
        return self.vblora_logits_A.numel() + self.vblora_logits_B.numel()

    def assemble(self, logits: torch.Tensor) -> torch.Tensor:
        """Each piece: the softmax-weighted sum of its top-k bank vectors ([..., h] logits → [..., b])."""
        top, index = logits.topk(self.options["top_k"], dim=-1)
        return torch.einsum("...k,...kb->...b", top.softmax(-1), self.shared.vblora_vector_bank[index])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.assemble(self.vblora_logits_A).reshape(self.r, self.layer.in_features)
        # B assembled rank-major over a view of the logits ([r, out/b, b]) and returned as the transpose of
        # its [r, out]: no copy, and with B column-major the backward's two products with it (dy·B, dyᵀ·xAᵀ)
        # ran 2-2.8x faster on the CPU (MKL, r=8) than with a row-major [out, r] B
        b = self.assemble(self.vblora_logits_B.transpose(0, 1)).reshape(self.r, self.layer.out_features).T
        return a, b

    # ---- PEFT's VBLORA format --------------------------------------------------------------
    def shared_to_saved(self) -> dict[str, torch.Tensor]:
        return {"vblora_vector_bank": self.shared.vblora_vector_bank.detach() * math.sqrt(self.scale)}

    @classmethod
    def remap_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if config.get("peft_type") == "LORALAB":
            return cls._from_loralab_layout(int(config["r"]), tensors)
        if not config.get("save_only_topk_weights"):
            return tensors
        out = {k: v for k, v in tensors.items() if not k.endswith((INDICES, WEIGHTS))}
        for logits in (k.removesuffix(INDICES) for k in tensors if k.endswith(INDICES)):
            out[logits] = logits_from_topk(tensors[logits + INDICES], tensors[logits + WEIGHTS],
                                           int(config["num_vectors"]))
        return out

    @staticmethod
    def _from_loralab_layout(r: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """loralab's older layout: logits_A [r·in/b, h] and logits_B [r·out/b, h] (rank-major), the bank
        under loralab_shared."""
        out = {}
        for key, t in tensors.items():
            path, _, leaf = key.rpartition(".")
            if key == "loralab_shared.bank":
                out[BANK] = t
            elif leaf == "logits_A":
                out[f"{path}.vblora_logits_A"] = t.reshape(r, -1, t.shape[-1])
            elif leaf == "logits_B":
                out[f"{path}.vblora_logits_B"] = t.reshape(r, -1, t.shape[-1]).transpose(0, 1)
            else:
                out[key] = t
        return out

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        opts, layers = {**DEFAULTS, **spec.options}, [m.layer for m in adapted.values()]
        return {"peft_type": "VBLORA", "r": spec.r, "num_vectors": opts["bank_size"],
                "vector_length": vector_length(opts["vector_length"], layers), "topk": opts["top_k"],
                "save_only_topk_weights": False, "vblora_dropout": spec.dropout,
                "init_vector_bank_bound": opts["bank_bound"], "init_logits_std": opts["logits_std"],
                "bias": "vblora_only" if spec.bias == "lora_only" else spec.bias}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        r, bias = int(config["r"]), config.get("bias") or "none"
        options = {"bank_size": int(config.get("num_vectors", 256)), "vector_length": int(config["vector_length"]),
                   "top_k": int(config.get("topk", 2)), "bank_bound": float(config.get("init_vector_bank_bound", 0.02)),
                   "logits_std": float(config.get("init_logits_std", 0.1))}
        return {"method": "vb-lora", "r": r, "alpha": float(r), "dropout": float(config.get("vblora_dropout") or 0),
                "options": options, "bias": "lora_only" if bias == "vblora_only" else bias}
