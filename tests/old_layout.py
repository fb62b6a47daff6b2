"""The adapter_config.json loralab wrote (format_version 1, "peft_type": "LORALAB") for a method before
that method was saved in PEFT's own format: the tests that such files still load build it here."""

from typing import Any


def old_loralab_config(method: str, r: int, alpha: float, targets: list[str] | None = None,
                       options: dict[str, Any] | None = None, dropout: float = 0.0) -> dict[str, Any]:
    return {"peft_type": "LORALAB", "task_type": None, "base_model_name_or_path": None, "r": r, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": targets or ["layer"], "exclude_modules": None,
            "use_rslora": False, "use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "lora_bias": False, "revision": None,
            "loralab": {"format_version": 1, "method": method, "options": options or {}, "init": "gaussian"}}
