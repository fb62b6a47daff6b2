"""LoKr: Kronecker-product adapter (KronA, Edalati et al., arXiv 2212.10650; LyCORIS's LoKr;
DiffuseKronA, arXiv 2402.17412).

ΔW = s · W₁ ⊗ W₂ with out = o₁·o₂ and in = i₁·i₂, each split as PEFT and LyCORIS split it (`split`):
by default o₁, i₁ are the largest divisors ≤ √n; with option `factor` f, (f, n / f) where f divides n,
else the largest divisor ≤ √n and ≤ f. W₁ [o₁, i₁] is trained in full (with option
`decompose_both`, as a rank-r product W1_a W1_b where r < max(o₁, i₁)/2); W₂ [o₂, i₂] is the
rank-r product W2_a W2_b where r < max(o₂, i₂)/2 and trained in full otherwise (PEFT's rule). s = alpha / r.
The unmerged path never forms ΔW: for x reshaped to X [i₁, i₂], (W₁ ⊗ W₂) x = vec(W₁ X W₂ᵀ). W2_a (or the
full W₂) starts at zero.

Saved in PEFT's LoKr format: `lokr_w1` [o₁, i₁] or `lokr_w1_a` [o₁, r] and `lokr_w1_b` [r, i₁], and
`lokr_w2` [o₂, i₂] or `lokr_w2_a` [o₂, r] and `lokr_w2_b` [r, i₂]; the config's `r`, `alpha` (alpha·√r
with rslora: the same s), `decompose_both` and `decompose_factor` (option factor, −1 for none). PEFT's LoKr
has no input dropout: `dropout` (training only) is not kept in the file, and PEFT's training-only
`rank_dropout` and `module_dropout` are not read. Nor has it a bias setting: it loads the biases saved with
bias="all" or "lora_only" but does not train them. loralab's LoKr has one rank for every layer, so files
with rank_pattern or alpha_pattern are refused. PEFT's LoKr takes nn.Linear (and nn.Conv1d, nn.Conv2d,
which loralab's LoKr does not), so a LoKr on GPT-2's Conv1D is read by loralab alone. Files in loralab's
old layout (`lokr_C` = W₁, `lokr_B` [o₂, r], `lokr_A` [r, i₂], W₂ = B A, peft_type LORALAB) are read too,
with the factor shapes they hold (`factor` then meant the divisor ≤ √n closest to f).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.rank_pattern import lycoris_patterns, read_patterns
from loralab.spec import AdapterSpec

OLD_KEYS = ("lokr_C", "lokr_A", "lokr_B")  # loralab's layout before PEFT's


def split(n: int, factor: int | None) -> tuple[int, int]:
    """PEFT's (LyCORIS's) `factorization`: (factor, n // factor) where `factor` divides n, else (a, n // a)
    with a the largest divisor of n with a² ≤ n and a ≤ factor."""
    if factor and n % factor == 0:
        return factor, n // factor
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0 and d <= (factor or n))
    return a, n // a


@METHODS.register("lokr")
class LoKr(AdapterMethod):
    name = "lokr"
    summary = "Kronecker product of a small full matrix and a low-rank block: ΔW = s·W₁ ⊗ W₂"
    paper = "2212.10650"
    param_formula = ("o₁·i₁ + r·(o₂ + i₂), out = o₁·o₂, in = i₁·i₂ (o₂·i₂ where r ≥ max(o₂, i₂)/2; "
                     "r·(o₁ + i₁) with decompose_both where r < max(o₁, i₁)/2)")
    peft_type = "LOKR"
    peft_lacks = ("bias", "fan_in_fan_out")
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"factor": None, "decompose_both": False}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        factor, both = self.options["factor"], self.options["decompose_both"]
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int) or factor < 1):
            raise ValueError(f"lokr option factor must be None or a positive integer, got {factor!r}")
        if not isinstance(both, bool):
            raise ValueError(f"lokr option decompose_both must be True or False, got {both!r}")
        self.build(*split(layer.out_features, factor), *split(layer.in_features, factor))

    def build(self, o1: int, o2: int, i1: int, i2: int) -> None:
        """(Re)make the trained factors of W₁ [o1, i1] and W₂ [o2, i2], each full or rank r by PEFT's rule."""
        for name in [n for n, _ in self.named_parameters() if n.startswith("lokr_")]:
            delattr(self, name)
        r, kw = self.r, {"dtype": self.layer.weight.dtype, "device": self.layer.weight.device}
        self.o1, self.o2, self.i1, self.i2 = o1, o2, i1, i2
        self.full_left = not (self.options["decompose_both"] and r < max(o1, i1) / 2)
        self.full_right = r >= max(o2, i2) / 2
        if self.full_left:
            self.lokr_w1 = nn.Parameter(torch.randn(o1, i1, **kw) / math.sqrt(i1))
        else:
            self.lokr_w1_a = nn.Parameter(torch.randn(o1, r, **kw) / math.sqrt(r))
            self.lokr_w1_b = nn.Parameter(torch.randn(r, i1, **kw) / math.sqrt(i1))
        if self.full_right:
            self.lokr_w2 = nn.Parameter(torch.zeros(o2, i2, **kw))
        else:
            self.lokr_w2_a = nn.Parameter(torch.zeros(o2, r, **kw))
            self.lokr_w2_b = nn.Parameter(torch.randn(r, i2, **kw) / math.sqrt(i2))

    def expected_trainable_params(self) -> int:
        left = self.o1 * self.i1 if self.full_left else self.r * (self.o1 + self.i1)
        right = self.o2 * self.i2 if self.full_right else self.r * (self.o2 + self.i2)
        return left + right

    # ---- the maths -------------------------------------------------------------------------
    def kron_factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """W₁ and W₂, each as the matrices whose product it is."""
        left = [self.lokr_w1] if self.full_left else [self.lokr_w1_a, self.lokr_w1_b]
        right = [self.lokr_w2] if self.full_right else [self.lokr_w2_a, self.lokr_w2_b]
        return left, right

    def delta_weight(self) -> torch.Tensor:
        left, right = self.kron_factors()
        return self.scale * torch.kron(reduce(torch.matmul, left), reduce(torch.matmul, right))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        lead = x.shape[:-1]
        left, right = self.kron_factors()
        y = x.reshape(-1, self.i1, self.i2)  # row-major: x = vec(X) with X [i1, i2]
        for m in reversed(right):  # X W₂ᵀ, one factor at a time
            y = y @ m.T
        y = reduce(torch.matmul, left) @ y
        return (self.scale * y).reshape(*lead, self.o1 * self.o2)

    # ---- PEFT's LoKr format ----------------------------------------------------------------
    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Reads PEFT's keys, or loralab's old layout (whose factor shapes it takes)."""
        if "lokr_C" not in tensors:
            super().from_saved(tensors, where)
            return
        missing = [k for k in OLD_KEYS if k not in tensors]
        if missing:
            raise ValueError(f"adapter file lacks {', '.join(f'{where}.{k}' for k in missing)}")
        c, a, b = (tensors[k] for k in OLD_KEYS)  # W₁, and W₂ = B A
        (o1, i1), (o2, r_b), (r_a, i2) = c.shape, b.shape, a.shape
        out, d = self.layer.out_features, self.layer.in_features
        if (o1 * o2, i1 * i2, r_a, r_b) != (out, d, self.r, self.r):
            raise ValueError(f"{where}.lokr_C {list(c.shape)}, lokr_B {list(b.shape)} and lokr_A {list(a.shape)} are "
                             f"not the factors of a rank-{self.r} LoKr on a layer of shape [{out}, {d}]")
        like = next(p for n, p in self.named_parameters() if n.startswith("lokr_"))
        self.build(o1, o2, i1, i2)
        self.to(like).requires_grad_(like.requires_grad)
        right = {"lokr_w2": b @ a} if self.full_right else {"lokr_w2_a": b, "lokr_w2_b": a}
        super().from_saved({"lokr_w1": c, **right}, where)

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        alpha = spec.alpha * math.sqrt(spec.r) if spec.rslora else spec.alpha  # PEFT's scale is alpha / r
        return {"peft_type": "LOKR", "r": spec.r, "alpha": alpha, **lycoris_patterns(spec, adapted, alpha),
                "decompose_both": options["decompose_both"], "decompose_factor": options["factor"] or -1,
                "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False,
                "use_effective_conv2d": False, "init_weights": True}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        factor = config.get("decompose_factor", -1)
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ValueError(f"this LoKr adapter has decompose_factor={factor!r}; loralab reads -1 (none) or a "
                             "positive integer")
        options = {"factor": None if factor == -1 else factor, "decompose_both": bool(config.get("decompose_both"))}
        return {"method": "lokr", "r": int(config.get("r", 8)), "alpha": float(config.get("alpha", 8)),
                "options": options, **read_patterns(config)}
