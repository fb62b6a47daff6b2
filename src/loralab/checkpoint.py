"""Adapter files in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys are PEFT's (`base_model.model.<module>.lora_A.weight`, …) and so are the config
fields (`peft_type`, `r`, `lora_alpha`, `target_modules`, `use_dora`, `use_rslora`, `rank_pattern`,
`alpha_pattern`, …), so `peft.PeftModel.from_pretrained` reads what loralab writes and the other
way round, per-layer ranks included (rank_pattern.py).
Methods PEFT lacks use the same layout with `"peft_type": "LORALAB"` and a `loralab`
section naming the method and its options; a method with a PEFT type of its own (BOFT) writes
and reads PEFT's config for it (`peft_config` / `spec_from_peft`). Every file is written to a
temporary name and renamed into place, so an interrupted save never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loralab import embedding_layers, param_targets, peft_tokens
from loralab.layers import SavedModule
from loralab.methods.base import METHODS, SavedTensors, check_shape
from loralab.model import ATTENTION_OUT, adapted_layers, add_adapter, get_spec, methods_of, remove_adapter, wrappers
from loralab.peft_lora_fields import TRAINED_AS, check_supported, init_from_peft
from loralab.rank_pattern import layer_patterns, read_patterns
from loralab.spec import AdapterSpec
from loralab.targets import candidate_modules, matches
from loralab.token_rows import SAVED_KEY as TOKEN_KEY
from loralab.token_rows import TokenRows

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = 1
PEFT_SHARED_FIELDS = ("task_type", "base_model_name_or_path", "target_modules", "exclude_modules", "bias",
                      "modules_to_save", "fan_in_fan_out", "inference_mode", "layers_to_transform", "layers_pattern",
                      "revision")  # what PEFT's LoRA config has and most other types' too
# Each field's value when unused: a method whose PEFT config lacks the field (`peft_lacks`) has it left out
# then, as PEFT warns of unexpected fields; a value that does something is written all the same.
UNUSED = {"exclude_modules": None, "bias": "none", "fan_in_fan_out": False, "layers_to_transform": None,
          "layers_pattern": None}
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask has no read-only form


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if cls.endswith(suffix)), None)


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "loralab_base", None) or getattr(config, "name_or_path", None) or None


def _saved_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names when they pick exactly these modules (as PEFT writes them), else full names. An adapted
    attention's out_proj goes with it, unnamed (model._with_attention_outputs)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    picked = {n for n, _ in candidate_modules(model) if matches(n, leaves)}
    return leaves if picked == set(paths) else sorted(paths)


def adapter_config(model: nn.Module, name: str) -> dict[str, Any]:
    spec = get_spec(model, name)
    method = METHODS.get(spec.method)
    layers = dict(adapted_layers(model, name))
    adapted = dict(methods_of(model, name))
    r, alpha = spec.r, spec.alpha
    offset = _has_base_offset(model, name)
    if offset:
        r = 2 * spec.r
        alpha = spec.scale * (math.sqrt(r) if spec.rslora else r)
    tokens = _token_layers(model, name)
    if peft_tokens.tokens_alone(spec, tokens, len(adapted), name):
        return peft_tokens.peft_config(spec, tokens, name, {"task_type": _task_type(model),
                                                            "base_model_name_or_path": _base_name(model)})
    patterned = [(p, m) for p, m in adapted.items() if not p.endswith(ATTENTION_OUT)]  # out_proj: its attention's
    patterned += [(f"{path}.{p}", update) for path, module in _param_layers(model, name).items()
                  for p, update in module.adapters[name].items()]
    rank_pattern, alpha_pattern = layer_patterns(patterned, r, alpha, spec.rslora, 2 if offset else 1)
    variant = method.peft_config(spec, adapted) if method.peft_type == "LORA" else None
    config: dict[str, Any] = {
        "peft_type": "LORA" if variant is not None else "LORALAB",
        "task_type": _task_type(model),
        "base_model_name_or_path": _base_name(model),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _saved_targets(model, [p for p in layers if not p.endswith(ATTENTION_OUT)]),
        "exclude_modules": None,
        "use_rslora": spec.rslora,
        "use_dora": False,
        "bias": spec.bias,
        "modules_to_save": spec.modules_to_save or None,
        "fan_in_fan_out": any(layer.kind.name == "hf-conv1d" for layer in layers.values()),
        "init_lora_weights": next((peft for peft, ours in TRAINED_AS.items() if ours == spec.init), True),
        "inference_mode": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": bool(spec.options.get("lora_bias")),
        "alora_invocation_tokens": spec.options.get("alora_invocation_tokens"),
        "revision": None,
        "trainable_token_indices": spec.trainable_token_indices,
        "target_parameters": spec.target_parameters,
        "layer_replication": spec.layer_replication,
        **(variant or {}),
    }
    if method.peft_type not in (None, "LORA"):  # PEFT's own format for the method (BOFT): its fields, not LoRA's
        fields = method.peft_config(spec, adapted)
        if (rank_pattern or alpha_pattern) and fields is not None and "rank_pattern" not in fields:
            fields = None  # layers with ranks or scales of their own, which that format has no place for
        if spec.trainable_token_indices is not None or spec.layer_replication is not None:
            fields = None  # only PEFT's LoRA config has trainable token rows and replicated layers
        if fields is not None:  # None: settings that format cannot hold, saved in loralab's layout
            shared = {k: config[k] for k in PEFT_SHARED_FIELDS
                      if not (k in method.peft_lacks and k in UNUSED and config[k] == UNUSED[k])}
            return {**shared, **fields}
    if config["peft_type"] == "LORALAB":
        config["loralab"] = {"format_version": FORMAT_VERSION, "method": spec.method,
                             "options": {**method.option_defaults, **spec.options},  # defaults as they were
                             "init": spec.init}
    return config


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Everything adapter `name` saves, under PEFT's key names."""
    spec = get_spec(model, name)
    tokens = _token_layers(model, name)
    adapted = list(methods_of(model, name))
    if peft_tokens.tokens_alone(spec, tokens, len(adapted), name):
        out = {PREFIX + k: t for k, t in peft_tokens.peft_tensors(tokens, name).items()}
    else:
        out = {f"{PREFIX}{path}.{TOKEN_KEY}": layer.rows[name].delta for path, layer in tokens.items()
               if not layer.tied}
    for path, method in adapted:
        for key, t in _saved_for_original_base(method).items():
            out[f"{PREFIX}{path}.{key}"] = t
        if method.shared is not None:
            out.update({f"{method.shared_prefix}{k}": t for k, t in method.shared_to_saved().items()})
    for path, module in wrappers(model):
        if isinstance(module, SavedModule) and name in module.copies:
            for key, t in module.copies[name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = t
    for path, module in _param_layers(model, name).items():
        out.update({PREFIX + k: t for k, t in param_targets.peft_tensors(path, module, name).items()})
    for key, t in _bias_tensors(model, spec.bias, name).items():
        out[PREFIX + key] = t
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def _token_layers(model: nn.Module, name: str) -> dict[str, TokenRows]:
    """Path → layer for every layer with adapter `name`'s token rows (a tied head's included: `layer.tied`)."""
    return {path: module for path, module in wrappers(model) if isinstance(module, TokenRows) and name in module.rows}


def _param_layers(model: nn.Module, name: str) -> dict[str, param_targets.ParamAdapters]:
    """Path → module for every module whose parameters adapter `name` updates."""
    return {path: module for path, module in wrappers(model)
            if isinstance(module, param_targets.ParamAdapters) and name in module.adapters}


def _has_base_offset(model: nn.Module, name: str) -> bool:
    return any(getattr(m, "base_offset", None) is not None for _, m in methods_of(model, name))


def _saved_for_original_base(method: nn.Module) -> dict[str, torch.Tensor]:
    """The method's tensors; where an initialiser moved s·B₀A₀ out of the base (PiSSA, MiLoRA,
    OLoRA, …), a rank-2r LoRA [A; A₀], [B, −B₀] that applies to the original base (as PEFT does)."""
    saved = method.to_saved()
    offset = getattr(method, "base_offset", None)
    if offset is None:
        return saved
    a0, b0 = offset
    saved.update(method.factor_tensors(torch.cat([method.lora_A.detach(), a0]),
                                       torch.cat([method.lora_B.detach(), -b0], dim=1)))
    return saved


def _bias_tensors(model: nn.Module, mode: str, name: str) -> dict[str, torch.Tensor]:
    if mode == "lora_only":
        return {f"{p}.base_layer.bias": layer.kind.bias for p, layer in adapted_layers(model, name)
                if layer.kind.bias is not None}
    if mode == "all":
        return {k: v for k, v in model.named_parameters()
                if k.endswith("bias") and ".original." not in k and ".copies." not in k}
    return {}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, name: str = "default",
                 embeddings: bool | str = "auto") -> Path:
    """Write adapter `name` as PEFT-compatible files into `out_dir`; returns the folder.

    `embeddings`: also write the input embedding's and the output head's whole weights (PEFT's
    `save_embedding_layers`, loralab.embedding_layers); "auto" does where the model's vocabulary was
    resized from its base's (new tokens), which the adapter then needs."""
    if embeddings not in (True, False, "auto"):
        raise ValueError(f"embeddings must be True, False or 'auto', got {embeddings!r}")
    out = Path(out_dir)
    config = adapter_config(model, name)
    tensors = adapter_tensors(model, name)
    if embeddings is True or (embeddings == "auto" and embedding_layers.resized(model, _base_name(model))):
        tensors.update({PREFIX + k: t.detach().to("cpu").contiguous().clone()
                        for k, t in embedding_layers.embedding_tensors(model).items()})
    meta = {"format": "pt", "loralab_adapter": name}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return out


# ---- reading -------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: not an adapter folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter's tensors with PEFT's `base_model.model.` prefix removed."""
    folder = Path(path)
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        legacy = folder / "adapter_model.bin"
        if legacy.is_file():
            raise ValueError(f"{legacy} is a pickle file; loralab reads only {WEIGHTS_FILE}")
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    try:
        tensors = load_file(str(file))
    except Exception as err:  # safetensors raises its own error types, and OSError on short reads
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def spec_from_config(config: dict[str, Any]) -> AdapterSpec:
    """An AdapterSpec from a PEFT- or loralab-written adapter_config.json, per-layer ranks and scales
    (rank_pattern, alpha_pattern) included: `spec.for_layer(path)` gives a layer's own."""
    peft_type = config.get("peft_type")
    formats = _peft_formats()
    if peft_type == peft_tokens.PEFT_TYPE:
        return AdapterSpec(**peft_tokens.spec_fields(config))
    if peft_type not in ("LORA", "LORALAB", *formats):
        raise ValueError(f"peft_type {peft_type!r} is not supported; loralab reads "
                         f"{', '.join(['LORA', 'LORALAB', peft_tokens.PEFT_TYPE, *sorted(formats)])} adapters")
    check_supported(config)  # LoRA's fields, which AdaLoRA's config has too
    targets = config["target_modules"]
    if targets is None and config.get("target_parameters"):
        targets = []  # parameters alone
    layers = config.get("layers_to_transform")
    if isinstance(targets, str) or layers in (None, []):  # PEFT ignores the layers for a regex, and an empty list
        layers = None
    shared = dict(targets=targets, exclude=config.get("exclude_modules"), bias=config.get("bias") or "none",
                  modules_to_save=list(config.get("modules_to_save") or []), layers=layers,
                  layers_pattern=(config.get("layers_pattern") or None) if layers is not None else None,
                  trainable_token_indices=config.get("trainable_token_indices"),
                  target_parameters=config.get("target_parameters") or None,
                  layer_replication=config.get("layer_replication") or None)
    if peft_type in formats:
        return AdapterSpec(**{**shared, **formats[peft_type].spec_from_peft(config)})
    extra = config.get("loralab") or {}
    method = extra.get("method") or _lora_variant(config)
    options = dict(extra.get("options") or {})
    if config.get("lora_bias"):
        options["lora_bias"] = True
    if config.get("alora_invocation_tokens"):
        options["alora_invocation_tokens"] = list(config["alora_invocation_tokens"])
    options.update(METHODS.get(method).options_from_peft(config) if not extra else {})
    init = init_from_peft(config)
    return AdapterSpec(
        method=method,
        **({"init": init} if init else {}),
        r=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora")),
        options=options,
        **read_patterns(config),
        **shared,
    )


def _lora_variant(config: dict[str, Any]) -> str:
    """The method a PEFT LoRA file is: the LoRA variant whose field is set in it (use_dora, …), else lora."""
    return next((name for name, cls in METHODS.items()
                 if cls.peft_type == "LORA" and cls.peft_lora_field and config.get(cls.peft_lora_field)), "lora")


def _peft_formats() -> dict[str, type]:
    """peft_type → method, for the methods saved in a PEFT format of their own (not LORA's): the one that reads
    the type's files where several share it (MISS: Bone; MiSS sets peft_reader False)."""
    return {cls.peft_type: cls for _, cls in METHODS.items()
            if cls.peft_type not in (None, "LORA") and cls.peft_reader}


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 activate: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Attach the adapter saved in `path` (by loralab or by PEFT) under `name`; returns the model.
    `dtype`: its tensors' dtype (default: the base weights'; see `add_adapter`)."""
    config = read_config(path)
    spec = spec_from_config(config)
    tensors = read_tensors(path)
    tensors = (peft_tokens.remap(tensors) if config.get("peft_type") == peft_tokens.PEFT_TYPE
               else METHODS.get(spec.method).remap_saved(config, tensors))
    add_adapter(model, spec, name, activate=activate, dtype=dtype)
    try:
        _fill(model, name, tensors, spec)
    except Exception:
        remove_adapter(model, name)
        raise
    return model


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], spec: AdapterSpec) -> None:
    used: set[str] = set()

    def take(key: str, target: torch.Tensor, what: str) -> None:
        if key not in tensors:
            raise ValueError(f"adapter file lacks {key} ({what})")
        check_shape(key, tensors[key].shape, target.shape)
        with torch.no_grad():
            target.copy_(tensors[key])
        used.add(key)

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    shared_done = False
    for path, method in methods_of(model, name):
        mine = SavedTensors(under(path))
        method.from_saved(mine, where=path)
        used.update(f"{path}.{k}" for k in mine.read)
        if method.shared is not None and not shared_done:
            prefix = method.shared_prefix.removeprefix(PREFIX)  # as read_tensors left the keys
            for key, t in method.shared.state_dict().items():
                take(prefix + key, t, "the adapter's shared tensors")
            shared_done = True
    for path, module in wrappers(model):
        if isinstance(module, SavedModule) and name in module.copies:
            for key, t in module.copies[name].state_dict().items():
                take(f"{path}.{key}", t, "a module saved in full")
    for path, module in _param_layers(model, name).items():
        for key, t in param_targets.peft_tensors(path, module, name).items():
            take(key, t, "an adapted parameter's factor")
    for path, layer in _token_layers(model, name).items():
        key = f"{path}.{TOKEN_KEY}"
        if layer.tied:  # the rows of the layer it is tied to (PEFT's TRAINABLE_TOKENS files hold a copy)
            used.add(key)
            continue
        take(key, layer.rows[name].delta, "the trainable token rows")
    embeddings = embedding_layers.planned_copies(model, tensors)
    used.update(key for key, _ in embeddings)
    params = dict(model.named_parameters())
    biases = {k: v for k, v in tensors.items() if k not in used and k.endswith("bias") and spec.bias != "none"}
    for key, t in biases.items():
        if key not in params:
            raise ValueError(f"adapter file holds bias {key}, which the model does not have")
        check_shape(key, t.shape, params[key].shape)
    unexpected = sorted(set(tensors) - used - set(biases))
    if unexpected:
        raise ValueError(f"adapter file holds tensors the model has no place for: {', '.join(unexpected[:5])}"
                         + (" …" if len(unexpected) > 5 else ""))
    with torch.no_grad():
        for key, t in biases.items():
            params[key].copy_(t)
        for key, weight in embeddings:  # the base's own weights: only once nothing else can fail
            weight.copy_(tensors[key])

