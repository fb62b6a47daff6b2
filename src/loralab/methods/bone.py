"""Bone: block-affine adaptation (Kang, arXiv 2409.15371; with share="rows", PEFT's MiSS "Bat").

W is cut into r×r blocks W_ij; every block of column-block j gets the same trained affine map, the
"weight guide" that keeps the update tied to the original weights:
    W'_ij = W_ij (I + B_j) + B_j,  i.e.  ΔW_ij = W_ij B_j + B_j,   B_j ∈ R^{r×r},
with in·r parameters in all and B = 0 at the start. With option `share="rows"` every block of row-block i
gets the same map instead, ΔW_ij = W_ij B_i + B_i (out·r parameters), as in the authors' code and PEFT.
Needs r to divide in and out. ΔW depends on W, so unmerging restores a copy. alpha is unused.

Saving: share="rows" is PEFT's MiSS with init_weights="bat", and is saved in its format: `miss_block`
[out/r, r, r] holds B_i, the config says `r`, `init_weights: "bat"`, `miss_dropout` (the dropout, which
PEFT's Bat never applies: training differs) and bias ("MiSS_only" for "lora_only"). MiSS has nothing for
the default share="columns", so that is saved in loralab's own layout as before (`bone_B` [in/r, r, r],
peft_type LORALAB), which PEFT does not read; old files in that layout load as they did. Bone reads every
PEFT MiSS file (the one reader of peft_type MISS): the Bat ones as a Bone, its default ("balance",
init_weights true or false) and "mini" variants, whose ΔW tiles one trained shard whatever W is, as loralab's
method "miss" (miss.py). PEFT's MiSS takes nn.Linear only, so a Bone on GPT-2's Conv1D is read by loralab alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec

SHARES = ("columns", "rows")


@METHODS.register("bone")
class Bone(AdapterMethod):
    name = "bone"
    summary = "Block-affine update: every r×r block W_ij becomes W_ij(I + B_j) + B_j"
    paper = "2409.15371"
    param_formula = "in·r (out·r with share='rows')"
    peft_type = "MISS"
    peft_when = "share='rows'"
    peft_lacks = ("fan_in_fan_out",)
    additive = False
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"share": "columns"}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        if self.options["share"] not in SHARES:
            raise ValueError(f"bone option share must be 'columns' (one B per column of blocks) or 'rows' (one B per "
                             f"row of blocks, PEFT's MiSS Bat), got {self.options['share']!r}")
        for size, what in ((layer.in_features, "in"), (layer.out_features, "out")):
            if size % spec.r:
                raise ValueError(f"bone needs r to divide {what}={size}, got r={spec.r}")
        self.bone_B = nn.Parameter(torch.zeros(self.shared_by() // spec.r, spec.r, spec.r,
                                               dtype=layer.weight.dtype, device=layer.weight.device))

    def shared_by(self) -> int:
        """The side of W whose r-blocks each have a B: in (columns of blocks) or out (rows of blocks)."""
        return self.layer.in_features if self.options["share"] == "columns" else self.layer.out_features

    def expected_trainable_params(self) -> int:
        return self.shared_by() * self.r

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.matrix().detach()
        r = self.r
        blocks = w.reshape(w.shape[0] // r, r, w.shape[1] // r, r).permute(0, 2, 1, 3)  # [out/r, in/r, r, r]
        b = self.bone_B if self.options["share"] == "columns" else self.bone_B[:, None]  # B_j, or B_i
        delta = blocks @ b + b
        return delta.permute(0, 2, 1, 3).reshape(w.shape)

    # ---- saving: PEFT's MiSS format (share="rows"), loralab's own layout (share="columns") ------------
    def saved_key(self) -> str:
        return "bone_B" if self.options["share"] == "columns" else "miss_block"

    def to_saved(self) -> dict[str, torch.Tensor]:
        return {self.saved_key(): self.bone_B.detach()}

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any] | None:
        if {**cls.option_defaults, **spec.options}["share"] == "columns":
            return None  # MiSS has no column-shared variant: loralab's layout
        return {"peft_type": "MISS", "r": spec.r, "init_weights": "bat", "mini_r": 1, "miss_dropout": spec.dropout,
                "bias": "MiSS_only" if spec.bias == "lora_only" else spec.bias}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Every variant of PEFT's MiSS: "bat" is a Bone (share="rows"); balance and mini are loralab's miss."""
        variant = config.get("init_weights", True)
        bias = config.get("bias") or "none"
        spec = {"r": int(config.get("r", 64)), "dropout": float(config.get("miss_dropout") or 0),
                "bias": "lora_only" if bias.endswith("_only") else bias}
        if variant == "bat":
            return {**spec, "method": "bone", "options": {"share": "rows"}}
        if variant == "mini":
            return {**spec, "method": "miss", "options": {"variant": "mini", "mini_r": int(config.get("mini_r", 1))}}
        if isinstance(variant, bool):  # balance; false only started M at random
            return {**spec, "method": "miss", "options": {"variant": "balance"}}
        raise ValueError(f"this MiSS adapter has init_weights={variant!r}; PEFT's MiSS variants are true or false "
                         "(balance, loralab's miss), 'mini' (miss with variant='mini') and 'bat' (bone with "
                         "share='rows')")

