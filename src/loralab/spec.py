"""AdapterSpec: what to attach (method, rank, scaling, targets, initialiser, options)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class AdapterSpec:
    """The recipe of one adapter.

    method:  a registered ΔW form (`loralab.list_methods()`), e.g. "lora" or "dora".
    r:       rank; alpha: scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).
    dropout: dropout on the adapter's input path.
    targets: module-name suffixes as PEFT matches them (["q_proj", "v_proj"]), a regular
             expression matched against the full module name, or "all-linear" (every linear
             layer except the output head).
    init:    a registered initialiser (`loralab.list_inits()`); init_options: its settings (e.g. EVA's rho).
    bias:    "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
    modules_to_save: module-name suffixes trained in full and saved with the adapter (e.g. "classifier").
    exclude: module-name suffixes or a regex never adapted, even when targets match them.
    layers:  only modules in these numbered blocks (PEFT's layers_to_transform), with suffix targets
             or "all-linear"; a module named in full in targets is kept whatever its block.
    layers_pattern: the name before the block index ("layers", "h"; PEFT's layers_pattern); None:
             the first numbered part of the module name.
    rslora:  rank-stabilised scaling alpha / sqrt(r) (arXiv 2312.03732).
    options: method-specific settings; a method refuses options it does not take.
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    init: str = "gaussian"
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=list)
    exclude: str | list[str] | None = None
    rslora: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    layers: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    init_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self.modules_to_save = list(self.modules_to_save or [])
        self.options = dict(self.options or {})
        self.init_options = dict(self.init_options or {})
        self.validate()

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer (the adapter's rank), got {self.r!r}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number (scale = alpha / r), got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not self.targets:
            raise ValueError("targets is empty: give module-name suffixes, a regex, or 'all-linear'")
        if isinstance(self.targets, list) and not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be non-empty strings, got {self.targets!r}")
        self._validate_layers()

    def _validate_layers(self) -> None:
        if self.layers is None:
            if self.layers_pattern is not None:
                raise ValueError("layers_pattern says where to read the block index of `layers`, but layers is not set")
            return
        indices = [self.layers] if isinstance(self.layers, int) else self.layers
        if not isinstance(indices, list) or not indices or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ValueError(f"layers must be a block index or a non-empty list of them (integers >= 0), "
                             f"got {self.layers!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise ValueError("layers works with suffix targets or 'all-linear' (as PEFT's layers_to_transform, "
                             "which a regex ignores); put the block indices into the regex instead")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterSpec field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)
