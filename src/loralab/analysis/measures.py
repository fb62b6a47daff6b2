"""Measures of an adapter's updates, each a pure function of matrices.

- singular values of ΔW = s·B·A from the factors alone: with B = Q_B R_B and Aᵀ = Q_A R_A,
  ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so they are those of an r×r core;
- effective rank (Roy & Vetterli 2007): exp of the entropy of σ/Σσ;
- intruder dimensions ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228):
  among the top-k singular vectors of the fine-tuned W + ΔW, those whose largest cosine
  similarity with every singular vector of W stays below ε;
- subspace similarity (the LoRA paper, arXiv 2106.09685 §7.2):
  φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j), U the right singular vectors of A.
"""

from __future__ import annotations

import torch


def factor_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale·B·A (A [r, in], B [out, r]) without forming the product."""
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(scale * rb @ ra.T)


def effective_rank(singular_values: torch.Tensor) -> float:
    s = singular_values.double().clamp_min(0)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def intruder_dimensions(base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10, epsilon: float = 0.5) -> int:
    """How many of the tuned matrix's top-k left singular vectors have max |cos| < ε with all of W's."""
    u_base = torch.linalg.svd(base.double(), full_matrices=False)[0]
    u_tuned = torch.linalg.svd(tuned.double(), full_matrices=False)[0][:, :top_k]
    similarity = (u_tuned.T @ u_base).abs().max(dim=1).values
    return int((similarity < epsilon).sum())


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """[in, r]: the right singular vectors of A [r, in], largest first."""
    return torch.linalg.svd(a.double(), full_matrices=False)[2].T


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for i ≤ r₁, j ≤ r₂ (a [r₁, r₂] grid in [0, 1])."""
    u1, u2 = right_singular_vectors(a1), right_singular_vectors(a2)
    overlap = (u1.T @ u2).pow(2)  # [r1, r2]
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.double)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.double)[None, :]
    return cumulative / torch.minimum(i, j)
