"""LoRA-LEGO (Zhao et al., arXiv 2409.16167, "Merging LoRAs like Playing LEGO"): every rank-one
component b_j a_jᵀ of every adapter is a "minimal semantic unit" (MSU); the MSUs of all adapters
are clustered into k groups (k = the target rank) and each cluster's centroid becomes one
component of the merged LoRA. Then the paper's dual reweighting:

- parameter reweighting (the centroid of non-aligned units is shorter than they are, "norm
  decay"): each centroid is rescaled to the mean norm of its cluster's units;
- output reweighting (k summed units vary more than one adapter's r̄, "variance expansion"):
  the merged update is scaled by √(r̄ / k), r̄ the mean rank of the merged adapters.

The full paper text was not at hand: both reweighting formulas follow its summary (norm decay,
variance expansion) and are our reading of it. Our choices where the paper leaves freedom: a
unit is written as [b; a] with ‖b‖ = ‖a‖ and the sign that makes a's largest entry positive
(b aᵀ is unchanged, and the same unit always gets the same vector); the adapter's scale and
weight are in b before that; k-means is seeded k-means++ then Lloyd's iterations.
"""

from __future__ import annotations

import math

import torch

from loralab.compose.merges._ops import stacked
from loralab.compose.merges.base import Factors, MergeOptions, merge_method


def units(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows [b_j; a_j] for the components b_j a_jᵀ of B A, balanced (‖b_j‖ = ‖a_j‖) and sign-fixed."""
    bt = b.T
    nb, na = bt.norm(dim=1, keepdim=True), a.norm(dim=1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny
    root = (nb * na).sqrt()
    rows = torch.cat([bt * (root / nb.clamp_min(tiny)), a * (root / na.clamp_min(tiny))], dim=1)
    lead = a.gather(1, a.abs().argmax(1, keepdim=True))
    return rows * torch.where(lead < 0, -1.0, 1.0)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Cluster labels: k-means++ seeding, then Lloyd's iterations until the labels settle."""
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(points, centres).min(1).values.square()
        pick = torch.multinomial(d2, 1, generator=generator) if d2.sum() > 0 else d2.argmax().view(1)
        centres = torch.cat([centres, points[pick]])
    labels = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        for j in range(k):
            if (labels == j).any():
                centres[j] = points[labels == j].mean(0)
        new = torch.cdist(points, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


@merge_method("lora-lego", "k-means over all adapters' rank-one units; centroids, dual reweighting", "2409.16167",
              rank_bound="sum", default_rank="max")
def lora_lego(factors: Factors, opts: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = stacked(factors)
    points = units(a, b)
    k = min(opts.rank, len(points))
    labels = kmeans(points, k, opts.generator)
    centres = torch.zeros(k, points.shape[1], dtype=points.dtype)
    for j in range(k):
        members = points[labels == j]
        if len(members):
            centre = members.mean(0)
            norm = centre.norm()
            centres[j] = centre * (members.norm(dim=1).mean() / norm) if norm > 0 else centre
    mean_rank = sum(f[0].shape[0] for f in factors) / sum(1 for f in factors if f[0].shape[0])
    out = b.shape[0]
    return centres[:, out:], centres[:, :out].T * math.sqrt(mean_rank / k)
