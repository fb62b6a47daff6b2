"""HF PEFT's TRAINABLE_TOKENS adapter files: token rows alone, with no low-rank layers.

`peft.TrainableTokensConfig(token_indices=..., target_modules=...)` writes `peft_type: TRAINABLE_TOKENS`
with one list of token ids for every targeted layer, and each wrapped layer's rows under
`<module>.trainable_tokens_delta` — a tied output head's too, a copy of the embedding's. In loralab
that adapter is `AdapterSpec(targets=[], trainable_token_indices=...)`: its rows live where a LoRA
file's do (`<module>.token_adapter.trainable_tokens_delta`, the embedding's only), and this module
translates between the two layouts. An adapter with anything more (layers, modules_to_save, biases,
other ids per layer) is saved as a LoRA file instead, which PEFT reads as LoRA with token rows.
"""

from __future__ import annotations

from typing import Any

import torch

from loralab.spec import AdapterSpec
from loralab.token_rows import SAVED_KEY, TokenRows

PEFT_TYPE = "TRAINABLE_TOKENS"
STANDALONE_KEY = "trainable_tokens_delta"


def tokens_alone(spec: AdapterSpec, layers: dict[str, TokenRows], adapted: int, name: str) -> bool:
    """Whether adapter `name` is token rows alone, with one list of ids, as PEFT's TRAINABLE_TOKENS holds it."""
    if spec.trainable_token_indices is None or adapted or spec.modules_to_save or spec.bias != "none":
        return False
    ids = {tuple(layer.rows[name].indices.tolist()) for layer in layers.values()}
    return len(ids) == 1


def peft_config(spec: AdapterSpec, layers: dict[str, TokenRows], name: str, shared: dict[str, Any]) -> dict[str, Any]:
    """PEFT's TrainableTokensConfig fields for these layers (paths of the layers owning their rows)."""
    owners = sorted(path for path, layer in layers.items() if not layer.tied)
    indices = layers[owners[0]].rows[name].indices.tolist()
    return {"peft_type": PEFT_TYPE, "task_type": shared["task_type"],
            "base_model_name_or_path": shared["base_model_name_or_path"], "token_indices": indices,
            "target_modules": owners[0] if len(owners) == 1 else owners, "init_weights": True,
            "inference_mode": True, "revision": None}


def peft_tensors(layers: dict[str, TokenRows], name: str) -> dict[str, torch.Tensor]:
    """Every wrapped layer's rows under PEFT's standalone key, a tied head's included (as PEFT writes them)."""
    return {f"{path}.{STANDALONE_KEY}": layer.rows[name].delta for path, layer in layers.items()}


def spec_fields(config: dict[str, Any]) -> dict[str, Any]:
    """AdapterSpec fields for a TRAINABLE_TOKENS config (its target_modules None: the input embedding)."""
    indices, targets = list(config["token_indices"]), config.get("target_modules")
    if targets is None:
        tokens: list[int] | dict[str, list[int]] = indices
    else:
        tokens = {t: indices for t in ([targets] if isinstance(targets, str) else targets)}
    return {"targets": [], "trainable_token_indices": tokens}


def remap(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TRAINABLE_TOKENS file's keys as a LoRA file names token rows."""
    suffix = "." + STANDALONE_KEY
    return {(k.removesuffix(suffix) + "." + SAVED_KEY if k.endswith(suffix) else k): v for k, v in tensors.items()}
