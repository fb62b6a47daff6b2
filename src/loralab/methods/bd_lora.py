"""BD-LoRA: LoRA with block-diagonal factors (Wang et al., arXiv 2510.23346).

ΔW = s·B·A as LoRA's, where on the layers named in option `block_a` A is block-diagonal,
A = diag(A_1, …, A_n) with each A_i of shape [r/n, in/n], and on those named in `block_b` B is,
B = diag(B_1, …, B_n) with each B_i [out/n, r/n] (n = `nblocks`). Sharded over n devices as a
tensor-parallel base is (B block-diagonal on column-parallel layers: q, k, v, gate, up; A on
row-parallel ones: o, down), each device computes its share of the update with no communication
for it. Names match as in PEFT: a pattern anywhere in the module's name; with `match_strict` every
adapted layer must match one. The defaults are that split for Llama-style names, n = 2, and plain
LoRA on layers neither names (PEFT's BdLoraConfig names no layers and is strict). Saved as PEFT's
`use_bdlora` LoRA variant, each block-diagonal factor as PEFT stores it, its blocks stacked: A as
[r, in/n], B as [out, r/n]; with loralab's own peft_type where a layer is GPT-2's Conv1D, on which
PEFT (0.21) cannot build the variant (it reads the layer's `in_features`, which Conv1D lacks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.methods.lora import LoRA
from loralab.spec import AdapterSpec


def _block_diagonal(stacked: torch.Tensor, n: int) -> torch.Tensor:
    """The dense matrix with the n row-chunks of `stacked` on its diagonal."""
    return torch.block_diag(*stacked.chunk(n, dim=0))


@METHODS.register("bd-lora")
class BDLoRA(LoRA):
    name = "bd-lora"
    summary = "LoRA with A or B block-diagonal per layer, for tensor-parallel serving without communication"
    paper = "2510.23346"
    param_formula = "r·in/n + out·r where A is block-diagonal, r·in + out·r/n where B is"
    peft_lora_field = "use_bdlora"
    layer_kinds = ("linear", "hf-conv1d")
    # by default the paper's split for Llama-style blocks, other layers plain LoRA; `block` is one layer's
    # ("a", "b" or None), from block_a and block_b
    option_defaults = {**LoRA.option_defaults, "nblocks": 2, "block_a": ["o_proj", "down_proj"],
                       "block_b": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], "match_strict": False,
                       "block": None}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        n, block = self.options["nblocks"], self.options["block"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"option nblocks must be a positive integer, got {n!r}")
        self.nblocks, self.block = n, block
        w = layer.weight
        if block == "a":
            self._check_divides("A", spec.r, layer.in_features)
            self.lora_A = nn.Parameter(torch.empty(spec.r, layer.in_features // n, dtype=w.dtype, device=w.device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif block == "b":
            self._check_divides("B", layer.out_features, spec.r)
            self.lora_B = nn.Parameter(torch.zeros(layer.out_features, spec.r // n, dtype=w.dtype, device=w.device))

    def _check_divides(self, factor: str, rows: int, cols: int) -> None:
        if rows % self.nblocks or cols % self.nblocks:
            raise ValueError(f"a block-diagonal {factor} of shape [{rows}, {cols}] needs both sides divisible by "
                             f"nblocks={self.nblocks}")

    @classmethod
    def layer_options(cls, options: dict[str, Any], path: str) -> dict[str, Any]:
        o = {**cls.option_defaults, **options}
        in_a = any(p in path for p in o["block_a"] or [])
        in_b = any(p in path for p in o["block_b"] or [])
        if in_a and in_b:
            raise ValueError(f"{path} matches both block_a and block_b: one factor per layer is block-diagonal")
        if not (in_a or in_b) and o["match_strict"]:
            raise ValueError(f"{path} matches neither block_a {o['block_a']} nor block_b {o['block_b']}; name it "
                             "in one, or set match_strict=False for a plain LoRA there")
        return {**options, "block": "a" if in_a else "b" if in_b else None}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self.lora_A, self.lora_B
        if self.block == "a":
            a = _block_diagonal(a, self.nblocks)
        elif self.block == "b":
            b = _block_diagonal(b, self.nblocks)
        return a, b, self.scale

    def expected_trainable_params(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any] | None:
        if any(method.layer.name == "hf-conv1d" for method in adapted.values()):
            return None
        o = {**cls.option_defaults, **spec.options}
        return {"use_bdlora": {"target_modules_bd_a": list(o["block_a"]) or None,
                               "target_modules_bd_b": list(o["block_b"]) or None,
                               "nblocks": o["nblocks"], "match_strict": o["match_strict"]}}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        bd = config.get("use_bdlora") or {}
        return {"nblocks": bd.get("nblocks", 1), "block_a": list(bd.get("target_modules_bd_a") or []),
                "block_b": list(bd.get("target_modules_bd_b") or []), "match_strict": bd.get("match_strict", True)}
