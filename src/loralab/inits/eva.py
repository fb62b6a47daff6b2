"""EVA: explained-variance adaptation (Paischer et al., arXiv 2410.07170).

A starts as the top right singular vectors of each layer's input activations on a few
calibration batches (the eigenvectors of the input covariance with the largest eigenvalues),
B = 0, so the adapter starts in the directions the data actually uses and the output is
unchanged.

Rank redistribution (option `rho`, as PEFT's EvaConfig.rho): the budget r × (number of layers)
goes to the largest explained-variance ratios λ_i / Σλ over all layers, each layer offering its
first round(rho·r); every layer keeps its top component, so layers end with ranks between 1 and
rho·r that sum to the budget, and a layer's A and B are resized to its rank. Each layer keeps the
scale alpha / r (PEFT's adjust_scaling_factors), and the saved adapter records the ranks in
PEFT's rank_pattern / alpha_pattern. The default rho = 1 keeps every layer at r (no
redistribution, and methods other than lora and dora work); PEFT's default is rho = 2. Unlike
PEFT, no layer drops to rank 0.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods
from loralab.inits.calibration import input_covariances
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers
from loralab.rank_pattern import check_resizable, set_factors


def allocate_ranks(ratios: dict[str, torch.Tensor], budget: int, caps: dict[str, int]) -> dict[str, int]:
    """Each layer's rank: one, plus its share of the remaining budget taken as the globally largest
    explained-variance ratios (`ratios[path]` descending), at most caps[path] per layer."""
    ranks = dict.fromkeys(ratios, 1)
    offered = [(float(v), path) for path, values in ratios.items() for v in values[1:caps[path]]]
    offered.sort(key=lambda item: -item[0])  # stable: ties go to the earlier layer
    for _, path in offered[:budget - len(ratios)]:
        ranks[path] += 1
    return ranks


@initialiser("eva", "A = top right singular vectors of the layer inputs on calibration data, B = 0; "
             "rho > 1 redistributes ranks by explained variance", "2410.07170", needs_data=True,
             options={"rho": 1.0})
@torch.no_grad()
def eva(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    rho = context.options["rho"]
    if isinstance(rho, bool) or not isinstance(rho, int | float) or rho < 1:
        raise ValueError(f"eva init option rho must be a number >= 1 (a layer's rank may grow to rho·r; "
                         f"1 keeps every layer at r), got {rho!r}")
    low_rank_methods(adapted, "eva")
    if rho > 1:
        for path, method in adapted:
            check_resizable(method, path, "eva's rank redistribution (rho > 1)")
    covariances = input_covariances(model, adapted, context, "eva: input activations")
    spectra = {path: torch.linalg.eigh(covariances[path]) for path, _ in over_layers(adapted, "eva")}  # ascending
    ranks = {path: method.r for path, method in adapted}
    if rho > 1:
        variances = {path: values.flip(0).clamp_min(0) for path, (values, _) in spectra.items()}  # descending
        ratios = {path: v / v.sum().clamp_min(torch.finfo(v.dtype).tiny) for path, v in variances.items()}
        caps = {path: min(round(rho * method.r), method.max_rank(method.layer)) for path, method in adapted}
        ranks = allocate_ranks(ratios, sum(ranks.values()), caps)
    for path, method in adapted:
        k = ranks[path]
        top = spectra[path][1][:, -k:].flip(1).T  # [k, in], largest eigenvalue first
        if k == method.r:
            method.lora_A.copy_(top.to(method.lora_A.dtype))
            method.lora_B.zero_()
        else:
            set_factors(method, top, method.lora_B.new_zeros(method.lora_B.shape[0], k), method.scale)
