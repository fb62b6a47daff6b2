"""CorDA: context-oriented decomposition adaptation (Yang et al., arXiv 2406.05223).

With C the covariance of a layer's inputs on calibration data, decompose W·C = U S Vᵀ, so
W = U S (Vᵀ C⁻¹). "corda" (instruction-previewed mode) starts the adapter on the r
largest components, B = U_r S_r^{1/2}, A = S_r^{1/2} (Vᵀ C⁻¹)_r; "corda-kpm"
(knowledge-preserved mode) on the r smallest, leaving the components the calibration data
relies on in the frozen base. The base keeps W − s·BA, so the output is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods, start_from_factors
from loralab.inits.calibration import input_covariances
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers


def context_factors(w: torch.Tensor, cov: torch.Tensor, r: int, largest: bool,
                    damping: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of the r largest (or smallest) components of W = U S (Vᵀ C⁻¹)."""
    c = cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    u, s, vh = torch.linalg.svd(w.double() @ c, full_matrices=False)
    pick = slice(0, r) if largest else slice(len(s) - r, len(s))
    right = torch.linalg.solve(c, vh[pick].T).T  # (Vᵀ C⁻¹)_r; C is symmetric
    root = s[pick].sqrt()
    return u[:, pick] * root, root[:, None] * right


def _corda(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext, largest: bool) -> None:
    name = "corda" if largest else "corda-kpm"
    low_rank_methods(adapted, name)
    covariances = input_covariances(model, adapted, context, f"{name}: input covariance")
    for path, method in over_layers(adapted, name):
        b, a = context_factors(method.layer.matrix().detach(), covariances[path], method.r, largest)
        start_from_factors(method, b.float(), a.float())


@initialiser("corda", "A, B from the top-r components of W·C (C: input covariance on calibration data)",
             "2406.05223", needs_data=True)
@torch.no_grad()
def corda(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    _corda(model, adapted, context, largest=True)


@initialiser("corda-kpm", "CorDA's knowledge-preserved mode: the adapter takes the r smallest components",
             "2406.05223", needs_data=True)
@torch.no_grad()
def corda_kpm(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    _corda(model, adapted, context, largest=False)
