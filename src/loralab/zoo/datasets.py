"""Built-in tasks (real data shipped in the package) and user data from JSONL/JSON/CSV/TSV files.

Classification rows are {"text": str, "label": int}; instruction (chat) rows are
{"prompt": str, "response": str}. Sources and licences: zoo/data/LICENSES.txt; the files are
rebuilt by scripts/make_builtin_data.py.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.registry import unknown_name_message

DATA = Path(__file__).parent / "data"
KINDS = {"classification": ("text", "label", "accuracy"), "causal-lm": ("prompt", "response", "perplexity")}


@dataclass
class Task:
    """A data set ready for training: rows already in loralab's form (see the module docstring)."""

    name: str
    kind: str  # "classification" | "causal-lm"
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)  # class names, index = label id (classification)
    description: str = ""
    text_field: str = ""  # defaults by kind: "text" / "prompt"
    label_field: str = ""  # defaults by kind: "label" / "response"
    metric: str = ""  # defaults by kind: "accuracy" / "perplexity"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        text, label, metric = KINDS[self.kind]
        self.text_field = self.text_field or text
        self.label_field = self.label_field or label
        self.metric = self.metric or metric


# ---- built-in tasks -------------------------------------------------------------------------
AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _read_gz(name: str) -> list[str]:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def _labelled_tsv(name: str, labels: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a shipped `text<TAB>label` file; label is an int, or a class name looked up in `labels`."""
    rows = []
    for line in _read_gz(name):
        text, label = line.rsplit("\t", 1)
        rows.append({"text": text.strip(), "label": labels.index(label) if labels else int(label)})
    return rows


def _sst2(split: str) -> list[dict[str, Any]]:
    return _labelled_tsv(f"sst2_{split}.tsv.gz")


def _agnews(split: str) -> list[dict[str, Any]]:
    return _labelled_tsv(f"agnews_{split}.tsv.gz", AGNEWS_LABELS)


def _gsm8k(split: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in _read_gz(f"gsm8k_{split}.jsonl.gz")]
    return [{"prompt": r["question"], "response": r["answer"]} for r in rows]


def gsm8k_final_answer(answer: str) -> str:
    """The number after GSM8K's '#### ' marker (commas removed), or "" when there is none."""
    match = re.search(r"####\s*([-\d.,]+)", answer)
    return match.group(1).replace(",", "").rstrip(".") if match else ""


BUILTIN = {
    "sst2": ("classification", _sst2, ["negative", "positive"],
             "SST-2 movie-review sentiment, 2 classes (8,000 train / 872 test sentences)"),
    "agnews": ("classification", _agnews, AGNEWS_LABELS,
               "AG News topic, 4 classes (10,000 train / 2,000 test articles)"),
    "gsm8k": ("causal-lm", _gsm8k, [],
              "GSM8K grade-school maths, chat format, loss on the answer "
              "(2,000 train / 1,319 test problems)"),
}


def list_tasks() -> dict[str, str]:
    """Built-in task names and a one-line description of each."""
    return {name: entry[3] for name, entry in BUILTIN.items()}


def load_task(name: str, max_train: int | None = None, max_test: int | None = None) -> Task:
    """A built-in task; `max_train`/`max_test` keep the first rows (the shipped files are pre-shuffled)."""
    if name not in BUILTIN:
        raise ValueError(unknown_name_message("task", name, BUILTIN))
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 0:
            raise ValueError(f"{arg} must be a row count >= 0 or None (all rows), got {value}")
    kind, reader, labels, description = BUILTIN[name]
    return Task(name, kind, reader("train")[:max_train], reader("test")[:max_test], list(labels), description)


# ---- user data ------------------------------------------------------------------------------
def _parse(path: Path, kind: str, text: str) -> list[Any]:
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of objects, not a {type(data).__name__}")
        return data
    if kind == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if kind == ".tsv":  # tabs separate, quotes are text
        return list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    raise ValueError(f"cannot read {path}: use .jsonl, .json (a list of objects), .csv or .tsv "
                     "(optionally .gz)")


def load_rows(path: str | Path, fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list of objects), .csv or .tsv file (optionally .gz).

    CSV/TSV need a header line; every row must have each of `fields` (see `require_fields`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: spreadsheets often start CSVs with a BOM
        rows = _parse(path, suffixes[-1] if suffixes else "", f.read())
    require_fields(rows, fields, str(path))
    return rows


def require_fields(rows: list[Any], fields: Sequence[str], source: str) -> None:
    """Raise naming the first row that lacks (or has an empty) one of `fields`, and the fields it has."""
    if not rows:
        raise ValueError(f"{source} holds no rows")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{source} row {i} is a {type(row).__name__}, not an object with fields")
        present = ", ".join(str(k) for k in row if k is not None) or "(none)"
        for name in fields:
            if name not in row or row[name] is None:
                raise ValueError(f"{source} row {i} lacks field {name!r}; it has: {present}")
            if isinstance(row[name], str) and not row[name].strip():
                raise ValueError(f"{source} row {i} has an empty {name!r}")


def _label_names(values: list[str]) -> list[str]:
    """Distinct label values in a stable order: numerically when all are integers, else alphabetically."""
    distinct = set(values)
    if all(re.fullmatch(r"-?\d+", v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def label_ids(values: Sequence[Any], labels: Sequence[str], source: str) -> list[int]:
    """Label values as ids into `labels`: a value is a label name, or an index 0..n-1 into them.

    Indices are accepted only when no label name is itself an integer (else they would be ambiguous).
    """
    index = {name: i for i, name in enumerate(labels)}
    numbered = not any(re.fullmatch(r"-?\d+", name) for name in labels)
    if numbered:
        index.update({str(i): i for i in range(len(labels))})
    ids = []
    for i, value in enumerate(values, 1):
        text = str(value).strip()
        if text not in index:
            allowed = ", ".join(labels) + (f" (or their indices 0-{len(labels) - 1})" if numbered else "")
            raise ValueError(f"{source} row {i} has label {text!r}; allowed labels: {allowed}")
        ids.append(index[text])
    return ids


def classification_rows(path: str | Path, text_field: str = "text", label_field: str = "label",
                        labels: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows as {"text", "label": int} and the label names (`labels`, else the distinct values, sorted)."""
    raw = load_rows(path, [text_field, label_field])
    values = [str(r[label_field]).strip() for r in raw]
    labels = list(labels) if labels else _label_names(values)
    ids = label_ids(values, labels, str(path))
    return [{"text": str(r[text_field]), "label": y} for r, y in zip(raw, ids)], labels


def instruction_rows(path: str | Path, prompt_field: str = "prompt", response_field: str = "response"
                     ) -> list[dict[str, Any]]:
    """Rows as {"prompt", "response"} from the user's field names."""
    raw = load_rows(path, [prompt_field, response_field])
    return [{"prompt": str(r[prompt_field]), "response": str(r[response_field])} for r in raw]
