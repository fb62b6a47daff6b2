"""Export an adapter merged into its base as a plain transformers model folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from loralab.loading import load_with_adapter
from loralab.model import merge_and_unload


def export_merged(base: str, adapter: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write base + adapter merged into `out_dir` (model and tokenizer); the folder appears whole or not at all."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    model, tokenizer = load_with_adapter(base, adapter)
    plain = merge_and_unload(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
