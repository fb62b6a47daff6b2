"""OFT: orthogonal fine-tuning (Qiu et al., arXiv 2306.07280).

W' = W R, with R a block-diagonal orthogonal matrix acting on the input side: r blocks of
size b = in / r, each the Cayley transform R_k = (I + Q_k)(I − Q_k)⁻¹ of a skew-symmetric Q_k
whose upper triangle is trained (Q = 0 at the start: R = I). Rotating the input keeps the
angles between W's neurons (the "hyperspherical energy") unchanged. Non-additive: the
unmerged path computes W(Rx − x); unmerging restores a copy.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod
from loralab.spec import AdapterSpec


def cayley(q: torch.Tensor) -> torch.Tensor:
    """(I + Q)(I − Q)⁻¹ for a batch of skew-symmetric matrices [..., b, b]: orthogonal. Solved and
    returned in float32 at least: torch has no 16-bit solve, and 16 bits would lose orthogonality."""
    wide = q.to(torch.promote_types(q.dtype, torch.float32))
    eye = torch.eye(q.shape[-1], dtype=wide.dtype, device=q.device).expand_as(wide)
    return torch.linalg.solve(eye - wide, eye + wide, left=False)


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


@METHODS.register("oft")
class OFT(AdapterMethod):
    name = "oft"
    summary = "Rotate W's input space by a block-diagonal orthogonal R (Cayley transform)"
    paper = "2306.07280"
    param_formula = "r·b(b−1)/2, b = in / r"
    additive = False
    layer_kinds = ("linear", "hf-conv1d")

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        if layer.in_features % spec.r:
            raise ValueError(f"oft needs r (the number of blocks) to divide in={layer.in_features}, got r={spec.r}")
        self.block = layer.in_features // spec.r
        self.oft_Q = nn.Parameter(torch.zeros(spec.r, self.block * (self.block - 1) // 2, dtype=layer.weight.dtype,
                                              device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return layer.in_features

    def expected_trainable_params(self) -> int:
        return self.r * self.block * (self.block - 1) // 2

    def rotations(self) -> torch.Tensor:
        """The r orthogonal blocks [r, b, b]."""
        return cayley_from_upper(self.oft_Q, self.block)

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
