"""Chat examples train on the response and its end-of-turn token only; batches pad correctly."""

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from loralab.train.data import (
    IGNORE,
    ChatDataset,
    ClassificationDataset,
    collate,
    make_dataset,
    make_examples,
)
from loralab.zoo import load_base, load_task

CHATML = ("{% for m in messages %}{% if loop.first %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ROWS = [{"prompt": "What is 2+2?", "response": "It is 4.\n#### 4"},
        {"prompt": "Name a colour, please, any colour at all.", "response": "Blue"}]


def byte_tokenizer(template: str | None, eos: str, specials: list[str]) -> PreTrainedTokenizerFast:
    """One token per byte (so decoding is exact) plus the template's special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


def trained_text(tok, example) -> str:
    return tok.decode([i for i, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE])


@pytest.mark.parametrize(("template", "eos", "specials", "end_of_turn"), [
    (CHATML, "<|im_end|>", ["<|im_start|>"], "<|im_end|>"),
    (LLAMA3, "<|end_of_text|>", LLAMA3_SPECIALS, "<|eot_id|>"),  # end of turn is not the eos token
    (None, "</s>", [], "</s>"),  # no chat template: the plain ### Question / ### Answer format
])
def test_labels_cover_exactly_the_response_and_end_of_turn(template, eos, specials, end_of_turn):
    tok = byte_tokenizer(template, eos, specials)
    examples = ChatDataset(ROWS, tok)
    for row, ex in zip(ROWS, examples):
        assert trained_text(tok, ex) == row["response"] + end_of_turn
        text = tok.decode(ex["input_ids"])
        assert row["prompt"] in text and text.index(row["prompt"]) < text.index(row["response"])
        assert ex["attention_mask"] == [1] * len(ex["input_ids"])
        assert len(ex["labels"]) == len(ex["input_ids"])
    if template is None:
        assert tok.decode(examples[0]["input_ids"]).startswith("### Question:\nWhat is 2+2?")


def test_long_prompt_loses_its_start_but_keeps_the_template():
    tok = byte_tokenizer(CHATML, "<|im_end|>", ["<|im_start|>"])
    row = {"prompt": "START " + "word " * 100, "response": "The answer."}
    ex = ChatDataset([row], tok, max_length=120)[0]
    text = tok.decode(ex["input_ids"])
    assert len(ex["input_ids"]) == 120
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("word <|im_end|>\n<|im_start|>assistant\nThe answer.<|im_end|>\n")
    assert "START" not in text and trained_text(tok, ex) == "The answer.<|im_end|>"


def test_long_response_is_cut_at_its_end_never_dropped():
    tok = byte_tokenizer(CHATML, "<|im_end|>", ["<|im_start|>"])
    ex = ChatDataset([{"prompt": "Q " * 100, "response": "abcdefghij" * 30}], tok, max_length=120)[0]
    assert len(ex["input_ids"]) == 120
    assert trained_text(tok, ex) == ("abcdefghij" * 30)[:60]  # the prompt keeps half of the window
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_base("minilm-l6", task="embedding")[1]


def test_classification_examples_match_rows(minilm_tokenizer):
    tok = minilm_tokenizer
    rows = [{"text": "A gripping film", "label": 1}, {"text": "dull " * 50, "label": 0},
            {"text": "ok", "label": 1}]
    examples = ClassificationDataset(rows, tok, max_length=16)
    assert [ex["labels"] for ex in examples] == [1, 0, 1]
    assert tok.decode(examples[0]["input_ids"], skip_special_tokens=True) == "a gripping film"
    assert len(examples[1]["input_ids"]) == 16 and examples[1]["attention_mask"] == [1] * 16


def test_make_dataset_picks_the_class_and_split(minilm_tokenizer):
    task = load_task("sst2", max_train=10, max_test=4)
    train, test = make_dataset(task, minilm_tokenizer), make_dataset(task, minilm_tokenizer, split="test")
    assert isinstance(train, ClassificationDataset) and (len(train), len(test)) == (10, 4)
    assert [ex["labels"] for ex in test] == [r["label"] for r in task.test]
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        make_dataset(task, minilm_tokenizer, split="dev")
    with pytest.raises(ValueError, match="task kind must be"):
        make_examples("regression", task.train, minilm_tokenizer)


def test_collate_pads_right_and_masks():
    cls = collate([{"input_ids": [7, 8], "attention_mask": [1, 1], "labels": 1},
                   {"input_ids": [9, 10, 11, 12], "attention_mask": [1, 1, 1, 1], "labels": 0}],
                  pad_token_id=3)
    assert cls["input_ids"].tolist() == [[7, 8, 3, 3], [9, 10, 11, 12]]
    assert cls["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert cls["labels"].tolist() == [1, 0] and cls["labels"].dtype == torch.long
    lm = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [5]}], 0)
    assert lm["labels"].tolist() == [[IGNORE, 6, 7], [5, IGNORE, IGNORE]]
    assert lm["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_base("smollm2-135m")[1]


@pytest.mark.slow
def test_smollm2_gsm8k_examples_train_on_the_answer_only(smol_tokenizer):
    tok = smol_tokenizer
    task = load_task("gsm8k", max_train=16)
    examples = make_dataset(task, tok)
    for row, ex in zip(task.train, examples):
        assert trained_text(tok, ex) == row["response"] + "<|im_end|>"
        assert ex["labels"][-1] == IGNORE  # the newline the template writes after <|im_end|>
    batch = collate(examples[:4], tok.pad_token_id)
    width = max(len(e["input_ids"]) for e in examples[:4])
    assert batch["labels"].shape == batch["input_ids"].shape == (4, width)
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert trained_text(plain, ChatDataset(ROWS[:1], plain)[0]) == ROWS[0]["response"] + tok.eos_token
