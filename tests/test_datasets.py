"""Built-in tasks hold the shipped real data; user files get clear errors."""

import json

import pytest

from loralab.zoo.datasets import classification_rows, gsm8k_final_answer, instruction_rows, load_task


def test_builtin_tasks_sizes_and_labels():
    sst2 = load_task("sst2")
    assert len(sst2.train) == 8000 and len(sst2.test) == 872
    assert {r["label"] for r in sst2.test} == {0, 1}
    ag = load_task("agnews", max_train=500)
    assert len(ag.train) == 500 and {r["label"] for r in ag.train} == {0, 1, 2, 3}
    gsm = load_task("gsm8k")
    assert len(gsm.test) == 1319 and gsm8k_final_answer(gsm.test[0]["response"]).lstrip("-").isdigit()


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="sst2"):
        load_task("sst")


def test_missing_field_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"row 2 lacks field 'label'; it has: text"):
        classification_rows(path)


def test_csv_labels_mapped_and_unknown_label_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,sentiment\ngood,pos\nbad,neg\n")
    rows, labels = classification_rows(path, "sentence", "sentiment")
    assert labels == ["neg", "pos"] and [r["label"] for r in rows] == [1, 0]
    with pytest.raises(ValueError, match="label 'neg'; allowed labels: pos"):
        classification_rows(path, "sentence", "sentiment", labels=["pos"])


def test_instruction_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    assert instruction_rows(path, "question", "answer") == [{"prompt": "q?", "response": "a"}]
    with pytest.raises(ValueError, match="lacks field 'prompt'"):
        instruction_rows(path)


def test_gsm8k_answer_parsing():
    assert gsm8k_final_answer("so 3,000 - 2 = <<3000-2=2998>>2998\n#### 2,998") == "2998"
