"""BOFT: orthogonal butterfly fine-tuning (Liu et al., arXiv 2311.06243).

W' = s ⊙ (W R): like OFT (oft.py, and as PEFT applies it) R rotates the input side, y = s ⊙ (W R x) + b,
so the angles between W's neurons are kept. R = F_1 F_2 ⋯ F_m is a product of m butterfly factors
(x passes F_m first). Each factor is block-diagonal with r orthogonal Cayley blocks of size b = in / r,
C = (I + Q)(I − Q)⁻¹ of a skew-symmetric Q whose upper triangle is trained (Q = 0 at the start: R = I),
laid over the input coordinates by the butterfly permutation: cut the input into half-blocks of b/2;
block k of factor i joins half-blocks j and j + 2^(i−1), j = (k // 2^(i−1))·2^i + k mod 2^(i−1).
F_1 is plain block-diagonal, so m = 1 is OFT; with m = 1 + log₂ r every input reaches every output,
as in the FFT's butterflies. s is a trained per-output scale (starting at one), as in the authors'
code and PEFT.

Options: `n_butterfly_factor` (m; m > 1 needs an even b and r a multiple of 2^(m−1)), and `block_size`
(b on every layer, in place of r blocks per layer; r is then unused).

Saved in PEFT's BOFT format: `boft_R` [m, r, b, b] holds the skew matrices Q (PEFT's blocks are
(I − Q)(I + Q)⁻¹ = Cᵀ and it applies x ↦ x Rₚ, Rₚ = Rᵀ: the same R), `boft_s` [out, 1] the scale.
Training differs in one respect: dropout here drops the rotation path's input, PEFT's drops whole blocks.
PEFT's BOFT takes nn.Linear (and nn.Conv2d) only, so a BOFT on GPT-2's Conv1D is read by loralab alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, check_shape
from loralab.methods.oft import cayley_from_upper, rotate_blocks, skew_from_upper
from loralab.spec import AdapterSpec


@METHODS.register("boft")
class BOFT(AdapterMethod):
    name = "boft"
    summary = "Rotate W's input space by a product of m butterfly-permuted block-diagonal orthogonal factors"
    paper = "2311.06243"
    param_formula = "m·r·b(b−1)/2 + out, b = in / r"
    peft_type = "BOFT"
    additive = False
    needs_base = True
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"n_butterfly_factor": 2, "block_size": None}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        d, m, size = layer.in_features, self.options["n_butterfly_factor"], self.options["block_size"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"boft option n_butterfly_factor must be a positive integer, got {m!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1 or d % size):
            raise ValueError(f"boft option block_size must be a positive integer dividing in={d}, got {size!r}")
        if size is None and d % spec.r:
            raise ValueError(f"boft needs r (blocks per butterfly factor) to divide in={d}, got r={spec.r}; "
                             "or set option block_size")
        self.blocks = d // size if size else spec.r
        self.block = d // self.blocks
        if m > 1 and (self.blocks % 2 ** (m - 1) or self.block % 2):
            raise ValueError(f"boft with n_butterfly_factor={m} needs an even block size and a number of blocks "
                             f"that 2^{m - 1} = {2 ** (m - 1)} divides; a layer with in={d} has {self.blocks} "
                             f"blocks of {self.block}")
        w = layer.weight
        self.boft_Q = nn.Parameter(torch.zeros(m, self.blocks, self.block * (self.block - 1) // 2,
                                               dtype=w.dtype, device=w.device))
        self.boft_s = nn.Parameter(torch.ones(layer.out_features, dtype=w.dtype, device=w.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return layer.in_features

    def expected_trainable_params(self) -> int:
        m = self.options["n_butterfly_factor"]
        return m * self.blocks * self.block * (self.block - 1) // 2 + self.layer.out_features

    # ---- the maths -------------------------------------------------------------------------
    def butterfly(self, x: torch.Tensor, factor: int, rotations: torch.Tensor, transpose: bool) -> torch.Tensor:
        """F x (or Fᵀ x) for butterfly factor `factor` (0 = F_1): gather each block's two half-blocks,
        rotate, put them back."""
        span = 2 ** factor  # half-blocks between the two halves of one block
        shape = x.shape
        halves = x.reshape(*shape[:-1], -1, 2, span, self.block // 2).transpose(-3, -2)
        turned = rotate_blocks(halves.reshape(*shape), rotations, transpose)
        return turned.reshape(halves.shape).transpose(-3, -2).reshape(shape)

    def rotate(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """R x = F_1(F_2(⋯ F_m x)), or Rᵀ x, for x [..., in]."""
        rotations = cayley_from_upper(self.boft_Q, self.block)
        order = range(len(rotations)) if transpose else reversed(range(len(rotations)))
        for i in order:
            x = self.butterfly(x, i, rotations[i], transpose)
        return x

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        x = self.drop(x)  # s ⊙ W R x − W x = s ⊙ W (R x − x) + (s − 1) ⊙ W x
        return self.boft_s * self.layer.apply(self.rotate(x) - x, self.layer.matrix()) + (self.boft_s - 1) * base

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.boft_s[:, None] * self.rotate(weight, transpose=True)  # row i of W R is Rᵀ wᵢ

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.matrix().detach()
        return self.merged_weight(w) - w

    # ---- PEFT's BOFT format ----------------------------------------------------------------
    def to_saved(self) -> dict[str, torch.Tensor]:
        return {"boft_R": skew_from_upper(self.boft_Q.detach(), self.block), "boft_s": self.boft_s.detach()[:, None]}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        missing = sorted({"boft_R", "boft_s"} - set(tensors))
        if missing:
            raise ValueError(f"adapter file lacks {', '.join(f'{where}.{k}' for k in missing)}")
        r, m = tensors["boft_R"], self.boft_Q.shape[0]
        if r.dim() == 4 and r.shape[0] != m:
            raise ValueError(f"{where}.boft_R holds {r.shape[0]} butterfly factors but the config says "
                             f"n_butterfly_factor={m} (PEFT without its CUDA extension keeps only one, whatever "
                             "its config says)")
        check_shape(f"{where}.boft_R", r.shape, (m, self.blocks, self.block, self.block))
        check_shape(f"{where}.boft_s", tensors["boft_s"].shape, (self.layer.out_features, 1))
        rows, cols = torch.triu_indices(self.block, self.block, offset=1)
        with torch.no_grad():
            self.boft_Q.copy_((r - r.transpose(-1, -2))[..., rows, cols] / 2)  # PEFT uses R's skew part
            self.boft_s.copy_(tensors["boft_s"][:, 0])

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        size = options["block_size"]
        return {"peft_type": "BOFT", "boft_block_size": size or 0, "boft_block_num": 0 if size else spec.r,
                "boft_n_butterfly_factor": options["n_butterfly_factor"], "boft_dropout": spec.dropout,
                "bias": "boft_only" if spec.bias == "lora_only" else spec.bias, "init_weights": True}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        size, num = int(config.get("boft_block_size") or 0), int(config.get("boft_block_num") or 0)
        if (size > 0) == (num > 0):
            raise ValueError("a BOFT adapter_config.json sets exactly one of boft_block_size and boft_block_num; "
                             f"this one has {size} and {num}")
        options = {"n_butterfly_factor": int(config.get("boft_n_butterfly_factor", 1)), "block_size": size or None}
        bias = config.get("bias") or "none"
        return {"method": "boft", "r": num or 1, "options": options, "dropout": float(config.get("boft_dropout") or 0),
                "bias": "lora_only" if bias == "boft_only" else bias}
