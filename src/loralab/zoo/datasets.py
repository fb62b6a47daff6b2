"""Built-in tasks (real data shipped in the package) and user data from JSONL/JSON/CSV/TSV files.

Classification rows are {"text": str, "label": int}; instruction rows are
{"prompt": str, "response": str}. Sources and licences: zoo/data/LICENSES.txt.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.registry import unknown_name_message

DATA = Path(__file__).parent / "data"


@dataclass
class Task:
    name: str
    kind: str  # "classification" | "causal-lm"
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "perplexity"


def _read_gz(name: str) -> str:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        return f.read()


def _tsv(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def _sst2(split: str) -> list[dict[str, Any]]:
    return [{"text": t.strip(), "label": int(y)} for t, y in _tsv(_read_gz(f"sst2_{split}.tsv.gz"))]


AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _agnews(split: str) -> list[dict[str, Any]]:
    return [{"text": t.strip(), "label": AGNEWS_LABELS.index(y)} for t, y in _tsv(_read_gz(f"agnews_{split}.tsv.gz"))]


def gsm8k_final_answer(answer: str) -> str:
    """The number after GSM8K's '#### ' marker (commas removed)."""
    match = re.search(r"####\s*([-\d.,]+)", answer)
    return match.group(1).replace(",", "").rstrip(".") if match else ""


def _gsm8k(split: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in _read_gz(f"gsm8k_{split}.jsonl.gz").splitlines() if line.strip()]
    return [{"prompt": r["question"], "response": r["answer"]} for r in rows]


BUILTIN = {
    "sst2": ("classification", _sst2, ["negative", "positive"], "SST-2 movie-review sentiment (2 classes)"),
    "agnews": ("classification", _agnews, AGNEWS_LABELS, "AG News topic (4 classes)"),
    "gsm8k": ("causal-lm", _gsm8k, [], "GSM8K grade-school maths, chat format, loss on the answer only"),
}


def list_tasks() -> dict[str, str]:
    return {name: entry[3] for name, entry in BUILTIN.items()}


def load_task(name: str, max_train: int | None = None, max_test: int | None = None) -> Task:
    """A built-in task; `max_train`/`max_test` keep the first rows (the shipped files are pre-shuffled)."""
    if name not in BUILTIN:
        raise ValueError(unknown_name_message("task", name, BUILTIN))
    kind, reader, labels, description = BUILTIN[name]
    return Task(name, kind, reader("train")[:max_train], reader("test")[:max_test], list(labels), description)


# ---- user data ------------------------------------------------------------------------------
def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list of objects), .csv or .tsv file (optionally .gz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if kind == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {i} is not valid JSON: {err}") from None
        return rows
    if kind == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of objects")
        return data
    if kind in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="," if kind == ".csv" else "\t"))
    raise ValueError(f"cannot read {path}: use .jsonl, .json, .csv or .tsv (optionally gzipped)")


def require_fields(rows: list[dict[str, Any]], fields: list[str], source: str) -> None:
    """Raise naming the first row that lacks one of `fields`, and the fields it does have."""
    if not rows:
        raise ValueError(f"{source} holds no rows")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{source} row {i} is not an object with fields")
        missing = [f for f in fields if f not in row or row[f] is None]
        if missing:
            raise ValueError(f"{source} row {i} lacks field {missing[0]!r}; it has: {', '.join(map(str, row))}")


def classification_rows(path: str | Path, text_field: str = "text", label_field: str = "label",
                        labels: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows as {"text", "label": int} and the label names (from `labels`, else sorted distinct values)."""
    raw = load_rows(path)
    require_fields(raw, [text_field, label_field], str(path))
    values = [str(r[label_field]).strip() for r in raw]
    if labels is None:
        labels = sorted(set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit()
                                                     else 0, v))
    index = {v: i for i, v in enumerate(labels)}
    rows = []
    for i, (r, v) in enumerate(zip(raw, values), 1):
        if v not in index:
            raise ValueError(f"{path} row {i} has label {v!r}; allowed labels: {', '.join(labels)}")
        rows.append({"text": str(r[text_field]), "label": index[v]})
    return rows, labels


def instruction_rows(path: str | Path, prompt_field: str = "prompt", response_field: str = "response"
                     ) -> list[dict[str, Any]]:
    raw = load_rows(path)
    require_fields(raw, [prompt_field, response_field], str(path))
    return [{"prompt": str(r[prompt_field]), "response": str(r[response_field])} for r in raw]
