"""MiSS: matrix shard sharing (Kang & Yin, arXiv 2409.15371; PEFT's MiSS, its "balance" and "mini" variants).

One trained shard is repeated over the whole update. With M ∈ R^{r×out} ("balance", PEFT's default):
    ΔW[o, i] = M[i mod r, o]          for o < out, i < in,
i.e. ΔW = [Mᵀ Mᵀ … Mᵀ] cut to in columns; an `in` that r does not divide is handled as PEFT does, by
zero-padding x to a multiple of r (the last, partial copy of Mᵀ keeps its first in mod r columns).
With variant="mini", M ∈ R^{r×mini_r} is tiled along out as well (mini_r must divide out, as PEFT requires):
    ΔW[o, i] = M[i mod r, o mod mini_r].
r·out (balance) or r·mini_r (mini) parameters, M = 0 at the start so the output starts unchanged; alpha is
unused (MiSS has no scale). r is at most in. ΔW does not depend on W (unlike Bone, PEFT's MiSS "bat").
The unmerged path never forms ΔW: y += (Σ_k x[k·r:(k+1)·r]) M, the sum of x's length-r chunks times M
(for mini: times the r×mini_r shard, the result repeated along out).

Saving: PEFT's MiSS format — `miss_block` [r, out] (balance) or [r, mini_r] (mini), the config's `r`,
`init_weights` (true / "mini"), `mini_r`, `miss_dropout` and bias ("MiSS_only" for "lora_only"). PEFT's
MiSS files are read by Bone's `spec_from_peft` (one reader per peft_type), which gives method "miss" for
these variants and "bone" for "bat". PEFT's MiSS takes nn.Linear only, so a MiSS on GPT-2's Conv1D is read
by loralab alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.methods.bone import Bone
from loralab.spec import AdapterSpec

VARIANTS = ("balance", "mini")


@METHODS.register("miss")
class MiSS(AdapterMethod):
    name = "miss"
    summary = "Shard sharing: one trained shard M repeated over ΔW, ΔW[o, i] = M[i mod r, o]; M starts at zero"
    paper = "2409.15371"
    param_formula = "r·out (r·mini_r with variant='mini')"
    peft_type = "MISS"
    peft_reader = False  # Bone reads PEFT's MiSS files, every variant (see Bone.spec_from_peft)
    peft_lacks = ("fan_in_fan_out",)
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"variant": "balance", "mini_r": None}
    # PEFT's example and benchmark train MiSS at LoRA's rate (2e-5 / 1e-4 on LLMs); ΔW's entries are M's own, with no
    # small A in between, and on `loralab compare`'s SST-2 run (MiniLM-L6, r=8) 3e-4 beat 1e-4 and 1e-3, as for Bone
    suggested_lr = 3e-4

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        variant, mini_r = self.options["variant"], self.options["mini_r"]
        if variant not in VARIANTS:
            raise ValueError(f"miss option variant must be 'balance' (one shard M [r, out], PEFT's default) or "
                             f"'mini' (M [r, mini_r] tiled along out), got {variant!r}")
        out = layer.out_features
        if variant == "balance":
            if mini_r is not None:
                raise ValueError(f"miss option mini_r is for variant='mini'; variant 'balance' has none, got "
                                 f"mini_r={mini_r!r}")
            shape = (spec.r, out)
        else:
            if isinstance(mini_r, bool) or not isinstance(mini_r, int) or mini_r < 1:
                raise ValueError(f"miss variant 'mini' needs option mini_r, a positive integer that divides the "
                                 f"layer's out features, got mini_r={mini_r!r}")
            if out % mini_r:
                raise ValueError(f"miss variant 'mini' needs mini_r to divide out={out} (as PEFT requires), "
                                 f"got mini_r={mini_r}")
            shape = (spec.r, mini_r)
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=layer.weight.dtype, device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return layer.in_features  # as PEFT: r <= in_features

    def expected_trainable_params(self) -> int:
        return self.r * (self.layer.out_features if self.options["variant"] == "balance" else self.options["mini_r"])

    def tiles(self) -> int:
        """How often the shard repeats along out (1 for balance)."""
        return self.layer.out_features // self.miss_block.shape[1]

    # ---- the maths -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        full = self.miss_block.repeat(1, self.tiles())  # [r, out]: column o is M[:, o mod mini_r]
        return full.T.repeat(1, math.ceil(self.layer.in_features / self.r))[:, :self.layer.in_features]

    def chunk_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_k of x's length-r chunks along its last axis, x zero-padded to a multiple of r: [..., r]."""
        x = self.drop(x)
        pad = -x.shape[-1] % self.r
        if pad:
            x = F.pad(x, (0, pad))
        return x.unflatten(-1, (-1, self.r)).sum(-2)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        y = self.chunk_sum(x) @ self.miss_block
        return y.repeat(*[1] * (y.dim() - 1), self.tiles()) if self.tiles() > 1 else y

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        h = self.chunk_sum(x)
        if self.tiles() == 1:
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.miss_block)
            return flat.view(out.shape)
        y = h @ self.miss_block  # [..., mini_r], added to each of out's tiles without repeating it
        return (out.unflatten(-1, (self.tiles(), -1)) + y.unsqueeze(-2)).flatten(-2)

    # ---- saving: PEFT's MiSS format -------------------------------------------------------
    def to_saved(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.miss_block.detach()}

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any] | None:
        options = {**cls.option_defaults, **spec.options}
        mini = options["variant"] == "mini"
        return {"peft_type": "MISS", "r": spec.r, "init_weights": "mini" if mini else True,
                "mini_r": options["mini_r"] if mini else 1, "miss_dropout": spec.dropout,
                "bias": "MiSS_only" if spec.bias == "lora_only" else spec.bias}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        return Bone.spec_from_peft(config)  # the one reader of PEFT's MiSS files
