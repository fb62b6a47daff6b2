"""The one protocol every adapter method follows.

A method is a small nn.Module built for one base layer (seen through a `LayerKind`: a
canonical [out, in] matrix W and the layer's operation `apply(x, W)`). It says how the
layer's output changes:

- additive methods implement `delta_weight()` (the dense ΔW) and, where it is cheaper,
  `delta(x)` (the unmerged path); the default `delta(x)` applies ΔW with the layer's own op;
- non-additive methods (DoRA, (IA)³, OFT, …) set `additive = False` and override
  `forward(x, base)` — the change to the output given the base output without bias — and
  `merged_weight(W)`.

Each method also declares its trainable-parameter count from its paper
(`expected_trainable_params`) and, where HF PEFT has the method, how its tensors are
named in PEFT's adapter files (`peft_type`, `to_saved` / `from_saved`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loralab.fused_lora import LowRankTerms
from loralab.layer_kinds import LayerKind
from loralab.registry import Registry
from loralab.spec import AdapterSpec


class AdapterMethod(nn.Module):
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # arXiv id
    param_formula: ClassVar[str] = ""  # human-readable, e.g. "r·(in + out)"
    peft_type: ClassVar[str | None] = None  # set where HF PEFT reads this method's files
    peft_lacks: ClassVar[tuple[str, ...]] = ()  # fields of PEFT's LoRA config that its config for peft_type lacks
    peft_when: ClassVar[str] = ""  # the settings under which the file is in peft_type's format, where not always
    peft_reader: ClassVar[bool] = True  # reads peft_type's files (spec_from_peft); False: a method sharing it does
    peft_lora_field: ClassVar[str | None] = None  # a LoRA variant saved as LORA: the config field marking it (DoRA's
    # use_dora); a LoRA file with that field set is read as this method
    additive: ClassVar[bool] = True
    needs_base: ClassVar[bool] = False  # forward() reads the base output
    suggested_lr: ClassVar[float] = 1e-3  # centre of `loralab compare`'s learning-rate sweep
    rank_schedule: ClassVar[str | None] = None  # the trainer callback the method is meant to train with
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "hf-conv1d", "conv", "embedding")
    option_defaults: ClassVar[dict[str, Any]] = {}
    # where the adapter file keeps `shared`'s tensors (make_shared); PEFT's own formats: "base_model."
    shared_prefix: ClassVar[str] = "base_model.model.loralab_shared."

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # a view of the base layer, not a submodule
        self.shared = shared  # one module for the whole adapter (make_shared), the same object in every layer
        self.aux_loss: torch.Tensor | None = None  # an extra training loss this forward produced (routers)
        self.batch_rows: torch.Tensor | None = None  # in a mixed-adapter batch, which rows this call computes
        unknown = sorted(set(spec.options) - set(self.option_defaults))
        if unknown:
            allowed = ", ".join(sorted(self.option_defaults)) or "none"
            raise ValueError(f"method {self.name!r} does not take option(s) {unknown}; it takes: {allowed}")
        if layer.name not in self.layer_kinds:
            raise ValueError(
                f"method {self.name!r} does not support {type(layer.base).__name__} layers; "
                f"it supports: {', '.join(self.layer_kinds)}"
            )
        self.options = {**self.option_defaults, **spec.options}
        self.r = spec.r
        self.scale = spec.scale
        limit = self.max_rank(layer)
        if spec.r > limit:
            raise ValueError(
                f"r={spec.r} is larger than {self.name!r} allows on a layer of shape "
                f"[{layer.out_features}, {layer.in_features}] (at most {limit})"
            )
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module | None:
        """Parameters shared by every layer of one adapter (Tied-LoRA, Uni-LoRA, MoS, VB-LoRA, …).

        Built once per adapter from all its layers' shapes; each method instance gets it as
        `self.shared`. Saved once, its state_dict keys under `shared_prefix` in the adapter file."""
        return None

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return min(layer.out_features, layer.in_features)

    # ---- the maths -------------------------------------------------------------------------
    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the adapter's input (never on an embedding's indices)."""
        return self.dropout(x) if self.dropout is not None and x.is_floating_point() else x

    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW, canonical shape [out, in]."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The change to the layer's output for input x (unmerged)."""
        return self.layer.apply(self.drop(x), self.delta_weight().to(self.layer.weight.dtype))

    def through(self, x: torch.Tensor, right: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """(left @ right) applied to x without forming the product on linear layers: ΔW = left·right."""
        if self.layer.name in ("linear", "hf-conv1d"):
            return F.linear(F.linear(self.drop(x), right), left)
        return self.layer.apply(self.drop(x), (left @ right).to(self.layer.weight.dtype))

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The change to the output; `base` is the base output without bias (if needs_base)."""
        return self.delta(x)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """out + forward(x, base); methods may fuse the add."""
        return out + self.forward(x, base)

    def apply_alone(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer output when this is the only adapter; `out` is the base output with bias."""
        return self.add_to(out, x, self.layer.without_bias(out) if self.needs_base else None)

    def fused_terms(self, x: torch.Tensor) -> LowRankTerms | None:
        """When this is the only active adapter: the layer as `loralab.fused_lora` computes it in one
        step, base included (alone, or with sibling layers that read the same input); None (the
        default) takes the usual path: the base layer, then `apply_alone`."""
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The canonical weight with this adapter folded in."""
        return weight + self.delta_weight().to(weight.dtype)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor | None:
        """The layer's bias with this adapter folded in, where the adapter changes it (else None)."""
        return None

    def keep(self, slot: str, tensors: tuple[torch.Tensor, ...], compute: Callable[[], Any], *extra: Any) -> Any:
        """compute() as it was last computed in this slot from the same tensors at the same versions (storage
        and in-place version counter; and the same extra values): for what a forward derives from its
        parameters alone (DoRA's norms, a factored method's factors). Under torch.compile it is computed in
        the graph, as the data-pointer check would break it. Parameters written through `.data` or a raw
        pointer bypass the version counter: write them in place under `torch.no_grad()` or load_state_dict."""
        if torch.compiler.is_compiling():
            return compute()
        key = (*extra, *((t.data_ptr(), t._version) for t in tensors))
        kept = self.__dict__.setdefault("_kept", {})
        if slot not in kept or kept[slot][0] != key:
            kept[slot] = (key, compute())
        return kept[slot][1]

    def forget(self, slot: str) -> None:
        """Drop what `keep` holds in this slot."""
        self.__dict__.get("_kept", {}).pop(slot, None)

    # ---- bookkeeping -----------------------------------------------------------------------
    def attach(self, host: nn.Module) -> None:
        """Called with the AdaptedLayer that now holds this method (routers look their experts up there)."""

    def expected_trainable_params(self) -> int:
        """The trainable-parameter count from the paper's formula, for this layer (without shared ones)."""
        raise NotImplementedError

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any] | None:
        """PEFT's adapter_config.json fields for this adapter (its methods by module path): for a `peft_type`
        other than LORA, `peft_type` included, added to the fields every PEFT config has (targets, bias, …);
        for LORA, what marks the LoRA variant, added to LoRA's fields (by default `peft_lora_field` set to
        true). None where PEFT's format cannot hold the settings (then saved as LORALAB)."""
        if cls.peft_type == "LORA":
            return {cls.peft_lora_field: True} if cls.peft_lora_field else {}
        raise NotImplementedError

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        """For a LoRA variant saved as LORA: its options, from the fields of PEFT's config that mark it."""
        return {}

    @classmethod
    def layer_options(cls, options: dict[str, Any], path: str) -> dict[str, Any]:
        """The options the layer at module `path` is built with (a method whose layers differ by name, BD-LoRA's
        block-diagonal factor, resolves them here; raises for a layer the options do not allow)."""
        return options

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        """For a `peft_type` other than LORA: the AdapterSpec fields (method, r, options, …) that PEFT's
        adapter_config.json gives, besides targets, exclude, bias and modules_to_save."""
        raise NotImplementedError

    @classmethod
    def expected_shared_params(cls, spec: AdapterSpec, layers: list[LayerKind]) -> int:
        """The paper's count for the parameters shared across layers (0 if none)."""
        return 0

    @classmethod
    def remap_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors (keys as `read_tensors` leaves them) as `to_saved` and `shared_to_saved` name them
        now, where a layout PEFT writes, or an older loralab one, names or shapes them otherwise."""
        return tensors

    def shared_to_saved(self) -> dict[str, torch.Tensor]:
        """`shared`'s tensors to save under `shared_prefix`: by default its state_dict, which loading copies back."""
        return self.shared.state_dict()

    def to_saved(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by their name under the module's path in the adapter file:
        by default the method's own parameters and buffers (frozen bases are saved, so a reload
        never depends on an RNG or an SVD being recomputed identically)."""
        buffers = [(n, b) for n, b in self.named_buffers() if n not in self._non_persistent_buffers_set]
        return {name: t.detach() for name, t in [*self.named_parameters(), *buffers] if "." not in name}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load what `to_saved` wrote (or an older layout's names for it); `where` names the module in error
        messages. The file's keys this never indexes are reported as unexpected (see `SavedTensors`)."""
        own = dict(self.to_saved())
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"adapter file lacks {', '.join(f'{where}.{k}' for k in missing)}")
        with torch.no_grad():
            for key, target in own.items():
                check_shape(f"{where}.{key}", tensors[key].shape, target.shape)
                target.copy_(tensors[key])


class FactoredMethod(AdapterMethod):
    """A method whose ΔW = factor_scale · B A for factors it assembles each call (frozen bases,
    mixtures, projections, …): subclasses implement `factors() -> (A [k, in], B [out, k])`.

    Where a forward records no gradients and the module is in eval mode (generation, evaluation,
    serving), the assembled factors are kept until a parameter or buffer of the method (its shared
    module's included) changes: assembling them can cost more than a one-token forward itself."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, factor_scale · B), kept between forwards without gradients in eval mode (see the class docstring)."""
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            a, b = self.factors()
            return a, self.factor_scale() * b

        if torch.is_grad_enabled() or self.training:
            self.forget("factors")
            return compute()
        return self.keep("factors", (*self.parameters(), *self.buffers()), compute, self.factor_scale())

    def factor_scale(self) -> float:
        return self.scale

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.factor_scale() * b @ a

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.through(x, *self.scaled_factors())


class SavedTensors(dict):
    """One module's tensors from an adapter file, as `from_saved` gets them: the keys it reads (by indexing
    or `get`) are noted in `read`, and the loader refuses a file whose other keys no module read."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self:
            return default
        return self[key]  # through __getitem__, which notes the key


def check_shape(name: str, got: torch.Size, want: torch.Size) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(
            f"tensor {name} has shape {list(got)} in the adapter file but the model needs {list(want)}: "
            "the adapter was made for a different base model or rank"
        )


METHODS: Registry[type[AdapterMethod]] = Registry("method", "loralab.methods")
