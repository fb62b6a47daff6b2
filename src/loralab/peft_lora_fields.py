"""Fields of PEFT's LoRA config beyond r, alpha, targets and the like, as loralab reads them.

Features of PEFT's LoRA that change what an adapter computes and that loralab does not implement
(Megatron's layers, Arrow's routing, …) are refused by name
(`check_supported`), rather than loaded as a plain LoRA that computes something else.

`init_lora_weights`: most of PEFT's initialisers only pick the starting A and B, which the saved
factors replace. Some also move s·B₀A₀ out of the base weight: PiSSA (arXiv 2404.02948), OLoRA
(arXiv 2406.01775) and CorDA, LoftQ and LoRA-GA (below). A file saved without PEFT's conversion
(`save_pretrained(path_initial_model_for_weight_conversion=...)`, which rewrites it as a rank-2r
LoRA on the original base and sets `init_lora_weights` to true) holds factors for that residual
base. PEFT re-forms it on load by running the init again on the original weights; loralab does the
same with its own `pissa` and `olora`, which compute the same residual. The adapter then remembers
its starting factors, so saving it from loralab writes the converted rank-2r file. A server cannot
re-form the base (every adapter it serves shares it), nor can readers of ΔW from the file alone
(combine, squeeze, analyze): they refuse such files and name the fix (`check_file_alone`).

CorDA needs the calibration statistics it was built from, LoftQ a quantised base and LoRA-GA the
gradients of its calibration batches: none of them is in the file, so such files are refused.
"""

from __future__ import annotations

import warnings
from typing import Any

UNSUPPORTED = {  # field → what it does; each is refused where set (not false, None or empty)
    "megatron_config": "Megatron's parallel linear layers",
    "arrow_config": "PEFT's Arrow router file; load its task adapters instead and route over them with "
                    "loralab.compose.add_arrow",
    "use_qalora": "QA-LoRA's group-pooled A (arXiv 2309.14717), which PEFT builds on GPTQ-quantised layers only",
}
RE_FORMED = {"pissa": "pissa", "olora": "olora"}  # PEFT's name → loralab's init, the same residual
TRAINED_AS = {"mica": "mica"}  # PEFT's name → loralab's init, for inits that decide what trains (not the base)
NOT_RE_FORMED = {"corda": "its calibration statistics", "loftq": "its quantised base model",
                 "lora_ga": "the gradients of its calibration batches"}


def _peft_init(config: dict[str, Any]) -> str | None:
    """A PEFT LoRA file's init_lora_weights by name, lower-cased, "pissa_niter_N" as "pissa"; None otherwise."""
    init = config.get("init_lora_weights")
    if config.get("peft_type") != "LORA" or not isinstance(init, str):
        return None
    return "pissa" if init.lower().startswith("pissa_niter_") else init.lower()


def init_from_peft(config: dict[str, Any]) -> str | None:
    """The loralab init that re-forms the base a PEFT LoRA file's factors apply to, or that decides which of
    them train (MiCA's frozen B); None where the file applies to the original base and trains as LoRA (every
    other init that leaves the base alone, or a converted file)."""
    name, init = _peft_init(config), config.get("init_lora_weights")
    if name is None:
        return None
    if name in TRAINED_AS:
        return TRAINED_AS[name]
    if name != init.lower():
        warnings.warn(f"init_lora_weights={init!r}: PEFT re-forms this adapter's residual base with a randomised "
                      "SVD, so even PEFT's own reload differs slightly; loralab uses the exact SVD it estimates",
                      stacklevel=3)
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
    """Whether this is a PEFT LoRA file whose loading re-forms its residual base in the model's base weights."""
    return _peft_init(config) in RE_FORMED


# implemented for LoRA (its options), not other formats
LORA_ONLY = {"lora_bias": "a trained bias on lora_B",
             "alora_invocation_tokens": "activated LoRA (the adapter acts only from its invocation tokens on)"}


def check_supported(config: dict[str, Any]) -> None:
    """Refuse a PEFT LoRA (or AdaLoRA) config that uses a feature loralab does not implement, naming it."""
    lacking = {**UNSUPPORTED, **(LORA_ONLY if config.get("peft_type") not in ("LORA", "LORALAB") else {})}
    used = [f"{field} ({what})" for field, what in lacking.items() if config.get(field)]
    if used:
        raise ValueError(f"this PEFT LoRA adapter uses {'; '.join(used)}, which loralab does not implement; "
                         "loading it as a plain LoRA would compute something else")


def check_file_alone(config: dict[str, Any], reader: str) -> None:
    """Refuse, for a reader of ΔW from the file alone, a PEFT LoRA file whose factors apply to a changed base."""
    if changes_base(config):
        raise ValueError(f"{reader} reads ΔW from the adapter file alone, but this PEFT adapter was saved with "
                         f"init_lora_weights={config['init_lora_weights']!r} and not converted, so its factors "
                         "apply to a base weight that init changed. Load it with loralab.load_adapter and save it "
                         "with loralab.save_adapter first: that writes it as a LoRA on the original base")
