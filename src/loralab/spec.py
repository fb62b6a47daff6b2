"""AdapterSpec: what to attach (method, rank, scaling, targets, initialiser, options)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

BIAS_MODES = ("none", "all", "lora_only")


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """The value HF PEFT gives module `path` from a rank_pattern / alpha_pattern: that of the first key k
    with `re.match(rf"(.*\\.)?({k})$", path)` (peft.utils.other.get_pattern_key), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_alpha(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def option_value(text: str) -> Any:
    """A method option given as text (`--option k=v`, a compare variant): JSON where it parses (numbers,
    true/false, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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
    trainable_token_indices: token rows of the input embedding trained in place of the base's (PEFT's
             TrainableTokens, e.g. for new chat tokens): a list of token ids, or {module name: ids} for other
             embeddings; an output head tied to the embedding uses the same rows. With targets=[] the
             adapter is those rows alone (PEFT's TRAINABLE_TOKENS).
    target_parameters: nn.Parameters that LoRA updates directly, by their names' endings as PEFT matches
             them (["experts.gate_up_proj", "experts.down_proj"]): 2-D weights, or a mixture-of-experts block's
             3-D stacks of them, one update per expert (loralab.param_targets). LoRA (or rsLoRA) only,
             without dropout, as in PEFT; with targets=[] the adapter is those updates alone. They start as
             PEFT's do (A Kaiming-uniform, B = 0): init, layers and exclude apply to targets only.
    layer_replication: ranges [start, end) of the model's blocks to rebuild its block list from, copies
             sharing the original's weights, each with adapters of its own ([[0, 4], [2, 5]]: blocks 0, 1, 2, 3,
             2, 3, 4), as PEFT's `layer_replication` (loralab.layer_replication).
    rank_pattern, alpha_pattern: per-layer r and alpha, as PEFT's: {"q_proj": 4, "layers.0.mlp.up_proj": 32}
             (a key matches a module whose name ends with it, the first matching key wins); a layer
             none matches takes r and alpha. Not for methods whose layers share parameters sized by r.
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
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    layer_replication: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        self.modules_to_save = list(self.modules_to_save or [])
        self.options = dict(self.options or {})
        self.init_options = dict(self.init_options or {})
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        tokens = self.trainable_token_indices
        if isinstance(tokens, tuple):
            self.trainable_token_indices = list(tokens)
        elif isinstance(tokens, dict):
            self.trainable_token_indices = {k: list(v) if isinstance(v, tuple) else v for k, v in tokens.items()}
        if isinstance(self.target_parameters, tuple):
            self.target_parameters = list(self.target_parameters)
        if isinstance(self.layer_replication, list | tuple):
            self.layer_replication = [list(r) if isinstance(r, list | tuple) else r for r in self.layer_replication]
        self.validate()

    def validate(self) -> None:
        if not is_rank(self.r):
            raise ValueError(f"r must be a positive integer (the adapter's rank), got {self.r!r}")
        if not is_alpha(self.alpha):
            raise ValueError(f"alpha must be a positive number (scale = alpha / r), got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        alone = self.trainable_token_indices is not None or self.target_parameters is not None
        if not self.targets and (self.targets != [] or not alone):
            raise ValueError("targets is empty: give module-name suffixes, a regex, or 'all-linear' (or targets=[] "
                             "with trainable_token_indices or target_parameters, for those alone)")
        if isinstance(self.targets, list) and not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be non-empty strings, got {self.targets!r}")
        self._validate_layers()
        self._validate_patterns()
        self._validate_tokens()
        self._validate_parameters()
        self._validate_replication()

    def _validate_replication(self) -> None:
        ranges = self.layer_replication
        if ranges is None:
            return
        if not isinstance(ranges, list) or not ranges or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in r)
                and 0 <= r[0] < r[1] for r in ranges):
            raise ValueError(f"layer_replication must be a non-empty list of block ranges [start, end) with "
                             f"0 <= start < end, e.g. [[0, 4], [2, 5]]; got {ranges!r}")

    def _validate_parameters(self) -> None:
        keys = self.target_parameters
        if keys is None:
            return
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"target_parameters must be a non-empty list of parameter names (or their endings), "
                             f"got {keys!r}")
        if self.method != "lora":
            raise ValueError(f"target_parameters takes method 'lora' (rslora=True for rsLoRA), as in PEFT; got "
                             f"{self.method!r}")
        if self.dropout:
            raise ValueError("target_parameters does not work with dropout (the update is to a weight that unknown "
                             f"code reads, so no input to drop), as in PEFT; got dropout={self.dropout}")

    def _validate_tokens(self) -> None:
        tokens = self.trainable_token_indices
        if tokens is None:
            return
        groups = tokens.items() if isinstance(tokens, dict) else [(None, tokens)]
        if isinstance(tokens, dict) and not tokens:
            raise ValueError("trainable_token_indices is an empty dict: name a module and its token ids, or use None")
        for key, ids in groups:
            where = "trainable_token_indices" + (f"[{key!r}]" if key is not None else "")
            if key is not None and (not isinstance(key, str) or not key):
                raise ValueError(f"trainable_token_indices keys are module names or their endings, got {key!r}")
            if not isinstance(ids, list | tuple) or not ids or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"{where} must be a non-empty list of token ids (integers >= 0), got {ids!r}")
            repeated = sorted({i for i in ids if list(ids).count(i) > 1})
            if repeated:
                raise ValueError(f"{where} lists token ids more than once: {repeated}")

    def _validate_patterns(self) -> None:
        for field_name, valid, positive in (("rank_pattern", is_rank, "a positive integer"),
                                            ("alpha_pattern", is_alpha, "a positive number")):
            for key, value in getattr(self, field_name).items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{field_name} keys are module names or their endings, got {key!r}")
                try:
                    re.compile(key)
                except re.error as err:
                    raise ValueError(f"{field_name} key {key!r} is not a valid regular expression: {err}") from None
                if not valid(value):
                    raise ValueError(f"{field_name}[{key!r}] must be {positive}, got {value!r}")

    def for_layer(self, path: str) -> AdapterSpec:
        """The spec module `path` is built with: its own r and alpha where a pattern names it, and the options
        its method gives that layer (AdapterMethod.layer_options)."""
        from loralab.methods.base import METHODS

        r = pattern_value(self.rank_pattern, path, self.r)
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        options = METHODS.get(self.method).layer_options(self.options, path)
        if (r, alpha, options) == (self.r, self.alpha, self.options):
            return self
        return replace(self, r=r, alpha=alpha, options=options)

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
