"""PEFT's `init_lora_weights` as loralab reads it from a LoRA adapter's config.

Most of PEFT's initialisers only pick the starting A and B, which the saved factors replace. Some
also move s·B₀A₀ out of the base weight: PiSSA (arXiv 2404.02948), OLoRA (arXiv 2406.01775) and
CorDA, LoftQ and LoRA-GA (below). A file saved without PEFT's conversion
(`save_pretrained(path_initial_model_for_weight_conversion=...)`, which rewrites it as a rank-2r
LoRA on the original base and sets `init_lora_weights` to true) holds factors for that residual
base. PEFT re-forms it on load by running the init again on the original weights; loralab does the
same with its own `pissa` and `olora`, which compute the same residual. The adapter then remembers
its starting factors, so saving it from loralab writes the converted rank-2r file. A server cannot
re-form the base (every adapter it serves shares it): it refuses such files and names the fix.

CorDA needs the calibration statistics it was built from, LoftQ a quantised base and LoRA-GA the
gradients of its calibration batches: none of them is in the file, so such files are refused.
"""

from __future__ import annotations

import warnings
from typing import Any

RE_FORMED = {"pissa": "pissa", "olora": "olora"}  # PEFT's name → loralab's init, the same residual
NOT_RE_FORMED = {"corda": "its calibration statistics", "loftq": "its quantised base model",
                 "lora_ga": "the gradients of its calibration batches"}


def init_from_peft(config: dict[str, Any]) -> str | None:
    """The loralab init that re-forms the base a PEFT LoRA file's factors apply to; None where the
    file applies to the original base (every init that leaves the base alone, or a converted file)."""
    init = config.get("init_lora_weights", True)
    if not isinstance(init, str):
        return None
    name = init.lower()
    if name.startswith("pissa_niter_"):
        warnings.warn(f"init_lora_weights={init!r}: PEFT re-forms this adapter's residual base with a randomised "
                      "SVD, so even PEFT's own reload differs slightly; loralab uses the exact SVD it estimates",
                      stacklevel=3)
        name = "pissa"
    if name in RE_FORMED:
        return RE_FORMED[name]
    lacking = next((why for key, why in NOT_RE_FORMED.items() if name.startswith(key)), None)
    if lacking is not None:
        raise ValueError(f"this adapter was saved with PEFT's init_lora_weights={init!r} and not converted: its "
                         f"factors apply to a base weight that {init} changed using {lacking}, which the file does "
                         "not hold. Convert it in PEFT (save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=<the initial adapter>)) and load that")
    return None


def changes_base(config: dict[str, Any]) -> bool:
    """Whether loading this LoRA file re-forms its residual base in the model's base weights."""
    init = config.get("init_lora_weights")
    return isinstance(init, str) and (init.lower() in RE_FORMED or init.lower().startswith("pissa_niter_"))
