"""Running calibration batches for data-driven initialisers: input covariances of the adapted
layers (EVA, CorDA) and averaged full-weight gradients (LoRA-GA), with a progress bar."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from loralab.inits.base import InitContext
from loralab.methods.base import AdapterMethod


def _batches(context: InitContext, desc: str) -> Iterator[dict[str, Any]]:
    if context.calibration is None:
        raise ValueError(f"{desc} needs calibration batches (add_adapter(..., calibration=batches))")
    got = list(itertools.islice(iter(context.calibration), context.budget))
    if not got:
        raise ValueError(f"{desc}: the calibration data is empty")
    yield from tqdm(got, desc=desc, leave=False)


def _move(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def input_covariances(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext,
                      desc: str) -> dict[str, torch.Tensor]:
    """Σ xxᵀ / n over every non-padding input row of each adapted (linear-like) layer, in float64."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = mask[0]
            padded = m is not None and x.dim() == 3 and x.shape[:2] == m.shape
            rows = (x[m.bool()] if padded else x.reshape(-1, x.shape[-1])).double()
            sums[path] = sums.get(path, 0) + rows.T @ rows
            counts[path] = counts.get(path, 0) + rows.shape[0]

        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(hook_for(path)) for path, _ in adapted]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(context, desc):
            batch = _move(batch, device)
            mask[0] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [p for p, _ in adapted if p not in sums]
    if missing:
        raise ValueError(f"{desc}: the calibration batches never reached {missing[0]}")
    return {p: sums[p] / counts[p] for p in sums}


def weight_gradients(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext,
                     desc: str) -> dict[str, torch.Tensor]:
    """The mean gradient of the loss w.r.t. each adapted layer's (canonical) base weight."""
    device = next(model.parameters()).device
    weights = {path: m.layer.weight for path, m in adapted}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    loss_fn = context.loss_fn or (lambda mdl, b: mdl(**b).loss)
    n = 0
    try:
        for batch in _batches(context, desc):
            with torch.enable_grad():  # initialisers run under no_grad
                loss = loss_fn(model, _move(batch, device))
                if loss is None:
                    raise ValueError(f"{desc}: the model returned no loss; pass loss_fn or batches with labels")
                loss.backward()
            n += 1
        return {path: dict(adapted)[path].layer.matrix(w.grad.float() / n) for path, w in weights.items()}
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        for p in trainable:
            p.requires_grad_(True)
