"""Chat examples train on the response only; batches pad correctly."""

import pytest

import loralab as ll
from loralab.train.data import IGNORE, chat_examples, classification_examples, collate


@pytest.fixture(scope="module")
def smol_tokenizer():
    return ll.load_base("smollm2-135m")[1]


@pytest.mark.slow
def test_labels_cover_exactly_the_response(smol_tokenizer):
    tok = smol_tokenizer
    ex = chat_examples([{"prompt": "What is 2+2?", "response": "It is 4.\n#### 4"}], tok)[0]
    trained = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(trained) == "It is 4.\n#### 4" + tok.eos_token
    assert "What is 2+2?" in tok.decode(ex["input_ids"])


@pytest.mark.slow
def test_long_prompt_truncated_from_the_left(smol_tokenizer):
    tok = smol_tokenizer
    ex = chat_examples([{"prompt": "word " * 400, "response": "The answer."}], tok, max_length=64)[0]
    assert len(ex["input_ids"]) == 64
    assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]).startswith("The answer.")


def test_collate_pads_and_masks():
    _, tok = ll.load_base("minilm-l6", task="classification", num_labels=2)
    exs = classification_examples([{"text": "good", "label": 1}, {"text": "a much longer text", "label": 0}], tok)
    batch = collate(exs, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == len(exs[0]["input_ids"])
    assert batch["labels"].tolist() == [1, 0]
    lm = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [5]}], 0)
    assert lm["labels"].tolist() == [[IGNORE, 6, 7], [5, IGNORE, IGNORE]]
