"""How one layer's LoRA updates combine, per merge method. Each function takes the adapters'
factors for that layer — A_i [r_i, in], B_i [out, r_i] with their scales already folded into
B_i — the weights w_i and the options, and returns new factors (A, B) with ΔW = B A.

- linear / cat: task arithmetic, exact: A = [A_1; …], B = [w_1 B_1, …] (ranks add up);
- svd: the weighted sum re-factorised to `rank` by truncated SVD (Eckart–Young);
- ties (Yadav et al., arXiv 2306.01708): trim each ΔW_i to its top-`density` entries by
  magnitude, elect each entry's sign by the sum, average the entries that agree;
- dare (Yu et al., arXiv 2311.03099): drop entries with probability 1 − density, rescale by
  1/density, sum; dare-ties: DARE, then TIES's sign election and disjoint mean;
- magnitude-prune: the weighted sum with only its top-`density` entries kept;
- lora-lego (arXiv 2409.16167): the rank-one units s·b_k a_kᵀ of all adapters are clustered
  (k-means, k = rank) and each cluster becomes one unit (its mean), then rescaled so the
  merged update keeps the norm of the weighted sum.
The dense ones are re-factorised by SVD to `rank` (exact when the result's rank fits).
"""

from __future__ import annotations

import torch

Factors = list[tuple[torch.Tensor, torch.Tensor]]


def concat(factors: Factors, weights: list[float], **_) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([f[0] for f in factors])
    b = torch.cat([w * f[1] for f, w in zip(factors, weights)], dim=1)
    return a, b


def weighted_sum(factors: Factors, weights: list[float]) -> torch.Tensor:
    return sum(w * (b @ a) for (a, b), w in zip(factors, weights))


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(delta.dtype), (u[:, :rank] * root).to(delta.dtype)


def keep_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top `density` fraction of entries by magnitude."""
    k = max(1, int(round(density * delta.numel())))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def elect_and_average(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES: the sign of the summed mass wins; entries agreeing with it are averaged."""
    stacked = torch.stack(deltas)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    return total / agree.sum(0).clamp_min(1)


def svd(factors: Factors, weights: list[float], rank: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
    return refactor(weighted_sum(factors, weights), rank)


def ties(factors: Factors, weights: list[float], rank: int, density: float, **_) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [keep_top(w * (b @ a), density) for (a, b), w in zip(factors, weights)]
    return refactor(elect_and_average(deltas), rank)


def _dropped(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def dare(factors: Factors, weights: list[float], rank: int, density: float, generator: torch.Generator,
         **_) -> tuple[torch.Tensor, torch.Tensor]:
    return refactor(sum(_dropped(w * (b @ a), density, generator) for (a, b), w in zip(factors, weights)), rank)


def dare_ties(factors: Factors, weights: list[float], rank: int, density: float, generator: torch.Generator,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [_dropped(w * (b @ a), density, generator) for (a, b), w in zip(factors, weights)]
    return refactor(elect_and_average(deltas), rank)


def magnitude_prune(factors: Factors, weights: list[float], rank: int, density: float,
                    **_) -> tuple[torch.Tensor, torch.Tensor]:
    return refactor(keep_top(weighted_sum(factors, weights), density), rank)


def lora_lego(factors: Factors, weights: list[float], rank: int, generator: torch.Generator,
              iterations: int = 50, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means over the rank-one units [b_k; a_k] (each split √ of its scale), then norm-preserving rescale."""
    units_b = torch.cat([w * b for (_, b), w in zip(factors, weights)], dim=1).T  # [n, out]
    units_a = torch.cat([a for a, _ in factors])  # [n, in]
    if rank >= units_a.shape[0]:
        return concat(factors, weights)
    points = torch.cat([units_b, units_a], dim=1)
    centres = points[torch.randperm(points.shape[0], generator=generator)[:rank]].clone()
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(1)
        for k in range(rank):
            members = points[labels == k]
            if len(members):
                centres[k] = members.mean(0)
    # a cluster's unit: the mean of its members' b and a, scaled by the member count (their updates add up)
    counts = torch.bincount(labels, minlength=rank).to(points.dtype)
    b = (centres[:, : units_b.shape[1]] * counts[:, None]).T
    a = centres[:, units_b.shape[1]:]
    target, merged = weighted_sum(factors, weights).norm(), (b @ a).norm()
    if merged > 0:
        b = b * (target / merged)
    return a, b


MERGES = {"linear": concat, "cat": concat, "svd": svd, "ties": ties, "dare": dare, "dare-ties": dare_ties,
          "magnitude-prune": magnitude_prune, "lora-lego": lora_lego}
DENSITY_METHODS = {"ties", "dare", "dare-ties", "magnitude-prune"}
