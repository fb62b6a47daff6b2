"""Operations the merge methods share: stacking factors, dense updates, SVD re-factorisation,
magnitude trimming, TIES's sign election and DARE's random drop."""

from __future__ import annotations

import torch

from loralab.compose.merges.base import Factors


def stacked(factors: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [A_1; A_2; …], B = [B_1, B_2, …]: B A is exactly Σ B_i A_i (ranks add up)."""
    return torch.cat([a for a, _ in factors]), torch.cat([b for _, b in factors], dim=1)


def deltas(factors: Factors) -> list[torch.Tensor]:
    """Each adapter's dense ΔW_i = B_i A_i, [out, in]."""
    return [b @ a for a, b in factors]


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (Eckart–Young) of a dense update, √σ on each side."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def refactor_product(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`refactor(b @ a, rank)` without forming b @ a: QR of both factors, then the SVD of the small core."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:rank].sqrt()
    return ((root[:, None] * vh[:rank]) @ qa.T).to(a.dtype), ((qb @ u[:, :rank]) * root).to(b.dtype)


def keep_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `density` fraction of entries largest in magnitude."""
    k = max(1, round(density * delta.numel()))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def elect_and_average(updates: list[torch.Tensor]) -> torch.Tensor:
    """TIES: per entry, the sign of the summed updates wins; the non-zero entries of that sign are averaged."""
    stacked_updates = torch.stack(updates)
    sign = torch.sign(stacked_updates.sum(0))
    agree = (torch.sign(stacked_updates) == sign) & (stacked_updates != 0)
    return (stacked_updates * agree).sum(0) / agree.sum(0).clamp_min(1)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by it."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))
