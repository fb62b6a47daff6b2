"""Whole embedding weights in an adapter file, as HF PEFT saves them for a resized vocabulary.

A model whose vocabulary grew (`model.resize_token_embeddings`, to add chat or tool tokens) no longer
fits its base's embedding, so PEFT's `save_pretrained(save_embedding_layers="auto")` writes the input
embedding's and the output head's weights whole beside the adapter, and loading copies them into the
base model (which must be resized the same way first). loralab writes and reads the same keys:
`<module>.weight`, or `<module>.base_layer.weight` where a LoRA adapts the embedding, or
`<module>.token_adapter.base_layer.weight` where token rows train on it. Like PEFT's, loading them
changes the base model's embeddings, for every adapter, until the model is loaded afresh.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from loralab.layers import AdaptedLayer
from loralab.token_rows import TokenRows

KEY_FORMS = (".weight", ".base_layer.weight", ".token_adapter.base_layer.weight")


def embedding_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path → module (loralab's wrapper, where there is one) of the input embedding and the output head
    (transformers models: their get_input_embeddings / get_output_embeddings)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
        if module is not None:
            found.append(module)
    return {path: m for path, m in model.named_modules() if any(m is f for f in found)}


def saved_key(path: str, module: nn.Module) -> str:
    """The key PEFT gives the layer's whole weight (see the module docstring)."""
    if isinstance(module, TokenRows):
        return path + KEY_FORMS[2]
    return path + (KEY_FORMS[1] if isinstance(module, AdaptedLayer) else KEY_FORMS[0])


def base_weight(module: nn.Module) -> torch.Tensor:
    return getattr(module, "unwrapped", module).weight


def base_vocabulary(base: str | None) -> int | None:
    """The vocabulary size in the config of the base the adapter names (an embedded name or a local
    folder), or None where that config cannot be read here."""
    if not base:
        return None
    from loralab.zoo.models import resolve

    try:
        config = json.loads((resolve(base) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def resized(model: nn.Module, base: str | None) -> bool:
    """Whether the model's input embedding has another number of rows than its base's vocabulary."""
    rows = [base_weight(m).shape[0] for m in embedding_layers(model).values() if isinstance(
        getattr(m, "unwrapped", m), nn.Embedding)]
    vocab = base_vocabulary(base)
    return bool(rows) and vocab is not None and rows[0] != vocab


def embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input embedding's and the output head's whole weights under PEFT's keys."""
    return {saved_key(path, m): base_weight(m) for path, m in embedding_layers(model).items()}


def planned_copies(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(key, the model's weight it goes into) for each whole embedding weight a file holds (see the module
    docstring), every shape checked first: one that does not fit names the tensor and, for another
    vocabulary, the resize to run. The caller copies them once nothing else can fail."""
    planned = []
    for path, module in embedding_layers(model).items():
        weight = base_weight(module)
        for key in (path + form for form in KEY_FORMS):
            if key not in tensors:
                continue
            saved = tensors[key]
            if saved.shape != weight.shape:
                resize = (f": the adapter was saved from a model with {saved.shape[0]} tokens; call "
                          f"model.resize_token_embeddings({saved.shape[0]}) before loading it"
                          if saved.shape[1:] == weight.shape[1:] else "")
                raise ValueError(f"{key} has shape {tuple(saved.shape)} but the model's is {tuple(weight.shape)}"
                                 + resize)
            planned.append((key, weight))
    return planned
