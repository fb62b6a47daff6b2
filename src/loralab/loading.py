"""Base model + adapter in one call, with the task read from the adapter's own config."""

from __future__ import annotations

import os

from torch import nn

from loralab.checkpoint import load_adapter, read_config, read_tensors

HEAD_NAMES = ("classifier", "score")


def task_of_adapter(path: str | os.PathLike) -> tuple[str, int | None]:
    """("causal-lm", None) or ("classification", num_labels) from adapter_config.json and the saved head."""
    config = read_config(path)
    if config.get("task_type") != "SEQ_CLS":
        return "causal-lm", None
    for key, t in read_tensors(path).items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in HEAD_NAMES:
            return "classification", int(t.shape[0])
    raise ValueError(f"{path} is a classification adapter but holds no classifier head to tell the label count")


def load_with_adapter(base: str, adapter: str | os.PathLike | None = None, name: str = "default",
                      task: str | None = None, num_labels: int | None = None, device: str | None = None,
                      dtype: str | None = None, merged: bool = False) -> tuple[nn.Module, object]:
    """(model, tokenizer): the base model (an embedded name or a local folder), with the adapter if given,
    on `device` in `dtype` (see `load_base`); `merged`: the adapter folded into the weights where that
    gives the same outputs (see `merge_for_inference`)."""
    from loralab.zoo.models import load_base

    if adapter is not None and task is None:
        task, num_labels = task_of_adapter(adapter)
    model, tokenizer = load_base(base, task=task or "causal-lm", num_labels=num_labels, device=device, dtype=dtype)
    if adapter is not None:
        load_adapter(model, adapter, name=name)
        if merged:
            merge_for_inference(model, name)
    model.eval()
    return model, tokenizer


def merge_for_inference(model: nn.Module, name: str) -> bool:
    """Fold adapter `name` into the base weights, so that inference runs at the base model's speed (an
    unmerged adapter adds its own work to every forward: to each token's, when generating). Not into
    16-bit weights — they would round much of the update away — and not for adapters that
    route each token (no single ΔW); True if merged."""
    from loralab.model import adapted_layers, merge, unmerge

    if any(layer.kind.weight.element_size() < 4 for _, layer in adapted_layers(model, name)):  # as merge's rule
        return False
    try:
        merge(model, name)
    except ValueError:  # routed per token: raised by the first layer, before it changes
        unmerge(model)
        return False
    return True
