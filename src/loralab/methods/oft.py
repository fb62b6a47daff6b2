"""OFT: orthogonal fine-tuning (Qiu et al., arXiv 2306.07280).

W' = W R, with R a block-diagonal orthogonal matrix acting on the input side: r blocks of
size b = in / r, each the Cayley transform R_k = (I + Q_k)(I − Q_k)⁻¹ of a skew-symmetric Q_k
whose upper triangle is trained (Q = 0 at the start: R = I). Rotating the input keeps the
angles between W's neurons (the "hyperspherical energy") unchanged. Non-additive: the
unmerged path computes W(Rx − x); unmerging restores a copy.

Options, as in PEFT: `block_size` (b on every layer, in place of r blocks per layer; r is then unused),
`block_share` (one Q for all the blocks of a layer) and `neumann_terms` (None: the exact Cayley transform;
n: PEFT's truncated Neumann series for it, I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1), cheaper and only
nearly orthogonal).

Saved in PEFT's OFT format: `oft_R.weight` [r, b(b−1)/2] ([1, …] with block_share) holds Q's upper
triangles, and the config says `use_cayley_neumann` / `num_cayley_neumann_terms`. PEFT applies x ↦ x Rₚ,
Rₚ = Rᵀ, whose exact transform is (I − Q)(I + Q)⁻¹ (the same R from the same Q) but whose series is
the one above for (I + Q)(I − Q)⁻¹ (the same R from −Q): a series file holds −Q. Files of PEFT before
0.18 (another series) and PEFT's constrained variant (`coft`) are refused. Training differs in one
respect: dropout here drops the rotation path's input; PEFT keeps it as `module_dropout`, which drops
whole blocks (and which PEFT 0.21 never applies). Files in loralab's old layout (`oft_Q`, peft_type
LORALAB) are read too. PEFT's OFT takes nn.Linear (and nn.Conv2d, nn.Embedding, which loralab's OFT does
not), so an OFT on GPT-2's Conv1D is read by loralab alone.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, check_shape
from loralab.spec import AdapterSpec

PEFT_SERIES_SINCE = "0.18.0"  # PEFT changed its Cayley–Neumann series in 0.18.0


def cayley(q: torch.Tensor) -> torch.Tensor:
    """(I + Q)(I − Q)⁻¹ for a batch of skew-symmetric matrices [..., b, b]: orthogonal. Solved and
    returned in float32 at least: torch has no 16-bit solve, and 16 bits would lose orthogonality."""
    wide = q.to(torch.promote_types(q.dtype, torch.float32))
    eye = torch.eye(q.shape[-1], dtype=wide.dtype, device=q.device).expand_as(wide)
    return torch.linalg.solve(eye - wide, eye + wide, left=False)


def cayley_series(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated Neumann series for (I + Q)(I − Q)⁻¹, in float32 at least: I + 2Q + 2Q² + … + 2Q^(n−2)
    + Q^(n−1) for n = terms ≥ 4, as PEFT computes it also for n = 3; I + 2Q for n = 2, I for n ≤ 1."""
    wide = q.to(torch.promote_types(q.dtype, torch.float32))
    out = power = torch.eye(q.shape[-1], dtype=wide.dtype, device=q.device).expand_as(wide)
    weights = [] if terms < 2 else [2.0] if terms == 2 else [2.0] * max(terms - 2, 2) + [1.0]
    for weight in weights:
        power = power @ wide
        out = out + weight * power
    return out


def skew_from_upper(upper: torch.Tensor, block: int) -> torch.Tensor:
    """The skew-symmetric matrices [..., b, b] whose strict upper triangles are `upper` [..., b(b−1)/2]."""
    rows, cols = torch.triu_indices(block, block, offset=1, device=upper.device)
    q = upper.new_zeros(*upper.shape[:-1], block, block)
    q[..., rows, cols] = upper
    return q - q.transpose(-1, -2)


def cayley_from_upper(upper: torch.Tensor, block: int) -> torch.Tensor:
    """The orthogonal blocks [..., b, b] whose skew-symmetric Q has strict upper triangle `upper`."""
    return cayley(skew_from_upper(upper, block))


def rotate_blocks(x: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """R x (or Rᵀ x) for x [..., n·b] and R = blockdiag(rotations [n, b, b]): block k of x times R_k,
    in x's dtype."""
    blocks = x.reshape(*x.shape[:-1], *rotations.shape[:2])
    pattern = "...kj,kji->...ki" if transpose else "...kj,kij->...ki"
    return torch.einsum(pattern, blocks, rotations.to(x.dtype)).reshape(x.shape)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _minor(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string: "0.18.0.dev0" → (0, 18)."""
    return tuple(map(int, re.findall(r"\d+", version)[:2]))


@METHODS.register("oft")
class OFT(AdapterMethod):
    name = "oft"
    summary = "Rotate W's input space by a block-diagonal orthogonal R (Cayley transform)"
    paper = "2306.07280"
    param_formula = "r·b(b−1)/2, b = in / r (b(b−1)/2 with block_share)"
    peft_type = "OFT"
    additive = False
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"block_size": None, "block_share": False, "neumann_terms": None}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        d, size, terms = layer.in_features, self.options["block_size"], self.options["neumann_terms"]
        if size is not None and not (_positive_int(size) and d % size == 0):
            raise ValueError(f"oft option block_size must be a positive integer dividing in={d}, got {size!r}")
        if size is None and d % spec.r:
            raise ValueError(f"oft needs r (the number of blocks) to divide in={d}, got r={spec.r}; "
                             "or set option block_size")
        if not isinstance(self.options["block_share"], bool):
            raise ValueError(f"oft option block_share must be True or False, got {self.options['block_share']!r}")
        if terms is not None and not _positive_int(terms):
            raise ValueError(f"oft option neumann_terms must be None (the exact Cayley transform) or a positive "
                             f"integer, got {terms!r}")
        self.blocks = d // size if size else spec.r
        self.block = d // self.blocks
        kept = 1 if self.options["block_share"] else self.blocks
        self.oft_Q = nn.Parameter(torch.zeros(kept, self.block * (self.block - 1) // 2, dtype=layer.weight.dtype,
                                              device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return layer.in_features

    def expected_trainable_params(self) -> int:
        return (1 if self.options["block_share"] else self.blocks) * self.block * (self.block - 1) // 2

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks [blocks, b, b] (the series' nearly orthogonal ones, with neumann_terms)."""
        q, terms = skew_from_upper(self.oft_Q, self.block), self.options["neumann_terms"]
        blocks = cayley(q) if terms is None else cayley_series(q, terms)
        return blocks.expand(self.blocks, -1, -1)

    def rotate(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """R x (or Rᵀ x) for x [..., in], block k of x times block k of R."""
        return rotate_blocks(x, self.rotations(), transpose)

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        x = self.drop(x)
        return self.layer.apply(self.rotate(x) - x, self.layer.matrix())

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.rotate(weight, transpose=True)  # row i of W R is Rᵀ wᵢ

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.matrix().detach()
        return self.merged_weight(w) - w

    # ---- PEFT's OFT format -----------------------------------------------------------------
    def _peft_sign(self) -> int:
        """PEFT's Q is ours with the exact transform, −ours with the series (see the module docstring)."""
        return 1 if self.options["neumann_terms"] is None else -1

    def to_saved(self) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self._peft_sign() * self.oft_Q.detach()}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Reads PEFT's `oft_R.weight`, or `oft_Q` of loralab's old layout (always the exact transform)."""
        key = next((k for k in ("oft_R.weight", "oft_Q") if k in tensors), None)
        if key is None:
            raise ValueError(f"adapter file lacks {where}.oft_R.weight")
        check_shape(f"{where}.{key}", tensors[key].shape, self.oft_Q.shape)
        with torch.no_grad():
            self.oft_Q.copy_(tensors[key] * (self._peft_sign() if key == "oft_R.weight" else 1))

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        size, terms = options["block_size"], options["neumann_terms"]
        return {"peft_type": "OFT", "r": 0 if size else spec.r, "oft_block_size": size or 0,
                "block_share": options["block_share"], "use_cayley_neumann": terms is not None,
                "num_cayley_neumann_terms": terms or 5, "coft": False, "eps": 6e-5, "module_dropout": spec.dropout,
                "bias": "oft_only" if spec.bias == "lora_only" else spec.bias, "init_weights": True,
                "peft_version": PEFT_SERIES_SINCE}  # the series as PEFT ≥ 0.18 computes it

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        size, r = int(config.get("oft_block_size") or 0), int(config.get("r") or 0)
        if (size > 0) == (r > 0):
            raise ValueError(f"an OFT adapter_config.json sets exactly one of r and oft_block_size; this one has "
                             f"{r} and {size}")
        if config.get("coft"):
            raise ValueError("this OFT adapter uses PEFT's constrained variant (coft=true), which loralab's OFT does "
                             "not have; loralab reads OFT adapters with coft=false")
        series = config.get("use_cayley_neumann", True)  # PEFT's default where the field is missing
        version = config.get("peft_version")  # PEFT writes it since 0.18
        if series and (version is None or _minor(version) < _minor(PEFT_SERIES_SINCE)):
            raise ValueError(f"this OFT adapter uses the Cayley–Neumann series of PEFT before 0.18 (peft_version "
                             f"{version}), which loralab does not compute; loralab reads PEFT "
                             "0.18+ series files and files with use_cayley_neumann=false")
        options = {"block_size": size or None, "block_share": bool(config.get("block_share")),
                   "neumann_terms": int(config.get("num_cayley_neumann_terms", 5)) if series else None}
        bias = config.get("bias") or "none"
        return {"method": "oft", "r": r or 1, "options": options, "dropout": float(config.get("module_dropout") or 0),
                "bias": "lora_only" if bias == "oft_only" else bias}
