"""Built-in tasks hold the shipped real data; user files load from every format with clear errors."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from loralab.zoo.datasets import (
    AGNEWS_LABELS,
    DATA,
    Task,
    classification_rows,
    gsm8k_final_answer,
    instruction_rows,
    list_tasks,
    load_rows,
    load_task,
    require_fields,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_builtin_tasks_sizes_labels_and_fields():
    assert set(list_tasks()) == {"sst2", "agnews", "gsm8k"}
    sst2 = load_task("sst2")
    assert (len(sst2.train), len(sst2.test)) == (8000, 872)
    assert {r["label"] for r in sst2.test} == {0, 1} and sst2.labels == ["negative", "positive"]
    fields = (sst2.kind, sst2.metric, sst2.text_field, sst2.label_field)
    assert fields == ("classification", "accuracy", "text", "label")
    gsm = load_task("gsm8k", max_test=5)
    assert len(gsm.train) == 2000 and len(gsm.test) == 5
    fields = (gsm.kind, gsm.metric, gsm.text_field, gsm.label_field)
    assert fields == ("causal-lm", "perplexity", "prompt", "response")
    assert set(gsm.test[0]) == {"prompt", "response"}
    assert gsm8k_final_answer(gsm.test[0]["response"]).isdigit()


def test_agnews_label_ids_follow_the_class_names_in_the_file():
    with gzip.open(DATA / "agnews_test.tsv.gz", "rt", encoding="utf-8") as f:
        raw = [line.rsplit("\t", 1) for line in f.read().splitlines()[:50]]
    task = load_task("agnews", max_train=500, max_test=50)
    assert len(task.train) == 500 and {r["label"] for r in task.train} == {0, 1, 2, 3}
    assert [(r["text"], task.labels[r["label"]]) for r in task.test] == [(t.strip(), y) for t, y in raw]
    assert task.labels == AGNEWS_LABELS == ["World", "Sports", "Business", "Sci/Tech"]  # standard ids


def test_unknown_task_and_bad_limits():
    with pytest.raises(ValueError, match="did you mean: sst2.*Known tasks: agnews, gsm8k, sst2"):
        load_task("sst")
    with pytest.raises(ValueError, match="max_train must be"):
        load_task("sst2", max_train=-1)
    with pytest.raises(ValueError, match="task kind must be one of classification, causal-lm"):
        Task("x", "regression", [], [])


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared source data")
def test_shipped_files_are_what_the_script_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_builtin_data", Path(__file__).parents[1] / "scripts" /
                                                  "make_builtin_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.OUT = tmp_path
    script.main(SHARED)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in DATA.iterdir() if not p.name.startswith("."))
    assert all((tmp_path / name).read_bytes() == (DATA / name).read_bytes() for name in made)
    assert sum((DATA / name).stat().st_size for name in made) < 3e6


def test_every_format_loads(tmp_path):
    rows = [{"text": 'he said "hi"', "label": "pos"}, {"text": "bad, sad", "label": "neg"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    csv_text = '\ufefftext,label\n"he said ""hi""",pos\n"bad, sad",neg\n'  # with a BOM, as spreadsheets write
    (tmp_path / "d.csv").write_text(csv_text, encoding="utf-8")
    (tmp_path / "d.tsv").write_text('text\tlabel\nhe said "hi"\tpos\nbad, sad\tneg\n')
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv", "d.jsonl.gz"):
        assert load_rows(tmp_path / name, ["text", "label"]) == rows, name


def test_unreadable_files_say_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"use \.jsonl, \.json"):
        load_rows(tmp_path / "d.txt")
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_rows(tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text('{"text": "a"}')
    with pytest.raises(ValueError, match="JSON list of objects, not a dict"):
        load_rows(tmp_path / "d.json")


def test_missing_or_empty_field_named_with_row_and_present_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y", "stars": 4}))
    with pytest.raises(ValueError, match=r"d.jsonl row 2 lacks field 'label'; it has: text, stars"):
        classification_rows(path)
    with pytest.raises(ValueError, match=r"src row 1 has an empty 'response'"):
        require_fields([{"prompt": "q", "response": "  "}], ["prompt", "response"], "src")
    with pytest.raises(ValueError, match="holds no rows"):
        require_fields([], ["text"], "src")


def test_labels_mapped_to_ids(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,sentiment\ngood,pos\nbad,neg\nfine,pos\n")
    rows, labels = classification_rows(path, "sentence", "sentiment")
    assert labels == ["neg", "pos"] and rows == [{"text": "good", "label": 1}, {"text": "bad", "label": 0},
                                                 {"text": "fine", "label": 1}]
    with pytest.raises(ValueError, match=r"row 2 has label 'neg'; allowed labels: pos"):
        classification_rows(path, "sentence", "sentiment", labels=["pos"])
    numbers = tmp_path / "n.jsonl"
    numbers.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("a", 10), ("b", 2), ("c", 0)]))
    rows, labels = classification_rows(numbers)
    assert labels == ["0", "2", "10"] and [r["label"] for r in rows] == [2, 1, 0]
    rows, labels = classification_rows(numbers, labels=list("abcdefghijk"))
    assert [r["label"] for r in rows] == [10, 2, 0]  # integer values index named labels


def test_instruction_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    assert instruction_rows(path, "question", "answer") == [{"prompt": "q?", "response": "a"}]
    with pytest.raises(ValueError, match="lacks field 'prompt'; it has: question, answer"):
        instruction_rows(path)


def test_gsm8k_answer_parsing():
    assert gsm8k_final_answer("so 3,000 - 2 = <<3000-2=2998>>2998\n#### 2,998") == "2998"
    assert gsm8k_final_answer("no marker") == ""
