"""Tokenised examples and padded batches for classification and instruction (chat) tuning.

A dataset is a list of examples {"input_ids", "attention_mask", "labels"}, tokenised once on
construction in batched calls. Chat examples use the tokenizer's own chat template; their
labels are -100 on every prompt and template token, so the loss falls on the response and
the end-of-turn token that closes it, nothing else.
"""

from __future__ import annotations

from typing import Any

import torch

from loralab.zoo.datasets import Task

IGNORE = -100
DEFAULT_MAX_LENGTH = {"classification": 128, "causal-lm": 512}


class ClassificationDataset(list[dict[str, Any]]):
    """Rows {"text", "label": int} as examples with input_ids, attention_mask and an int label."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, max_length: int = 128) -> None:
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
        super().__init__({"input_ids": ids, "attention_mask": mask, "labels": int(r["label"])}
                         for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], rows))


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it before its answer (chat template, or a plain fallback)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"### Question:\n{prompt}\n\n### Answer:\n"


def _conversation(tokenizer, prompt: str, response: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
    return chat_prompt(tokenizer, prompt) + response + (tokenizer.eos_token or "")


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cut_prompt(prompt: list[int], keep: int, template: list[int]) -> list[int]:
    """The last `keep` prompt tokens, but the template's own head and tail kept whole where they fit.

    `template` is the prompt rendered around empty content, so the tokens shared with it at
    either end are template (system prompt, role markers) and the user's text lies between.
    """
    if keep >= len(prompt):
        return prompt
    head = _common_prefix(template, prompt)
    tail = min(_common_prefix(template[::-1], prompt[::-1]), len(template) - head)
    if keep < head + tail:
        return prompt[len(prompt) - keep:]
    body_end = len(prompt) - tail
    return prompt[:head] + prompt[body_end - (keep - head - tail): body_end] + prompt[body_end:]


class ChatDataset(list[dict[str, Any]]):
    """Rows {"prompt", "response"} as chat examples whose labels cover the response only.

    The template text after the response (e.g. "<|im_end|>\\n") is trained up to and including
    its first special token, the end-of-turn marker. Too-long examples lose the user's prompt
    text from the left (the template's system prompt and role markers stay); only a response
    longer than half of max_length is cut (at its end).
    """

    def __init__(self, rows: list[dict[str, Any]], tokenizer, max_length: int = 512) -> None:
        prompts = [chat_prompt(tokenizer, r["prompt"]) for r in rows]
        fulls = [_conversation(tokenizer, r["prompt"], r["response"]) for r in rows]
        suffixes = [_suffix(p, f, r["response"]) for p, f, r in zip(prompts, fulls, rows)]
        plain = not getattr(tokenizer, "chat_template", None)  # templates write their own special tokens
        p_ids = tokenizer(prompts, add_special_tokens=plain)["input_ids"]
        f_ids = tokenizer(fulls, add_special_tokens=plain)["input_ids"]
        distinct = sorted(set(suffixes))
        s_ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"])) if distinct \
            else {}
        template = tokenizer(chat_prompt(tokenizer, ""), add_special_tokens=plain)["input_ids"]
        special = _special_ids(tokenizer)
        super().__init__(_example(p, f, s_ids[s], template, special, max_length)
                         for p, f, s in zip(p_ids, f_ids, suffixes))


def _suffix(prompt: str, full: str, response: str) -> str:
    """Template text after the response ("" when the template rewrote the response or the prompt)."""
    rest = full[len(prompt):] if full.startswith(prompt) else ""
    at = rest.find(response)
    return rest[at + len(response):] if at >= 0 else ""


def _example(prompt: list[int], full: list[int], suffix: list[int], template: list[int], special: set[int],
             max_length: int) -> dict[str, Any]:
    start = _common_prefix(prompt, full)  # normally len(prompt)
    response = full[start:]
    trailing = 0
    if suffix and response[-len(suffix):] == suffix:
        end_of_turn = next((i for i, t in enumerate(suffix) if t in special), len(suffix) - 1)
        trailing = len(suffix) - 1 - end_of_turn
    labels = response[: len(response) - trailing] + [IGNORE] * trailing
    keep_prompt = start
    if start + len(response) > max_length:
        keep_prompt = max(max_length - len(response), min(start, max_length // 2))
    keep_response = max_length - keep_prompt
    ids = _cut_prompt(full[:start], keep_prompt, template) + response[:keep_response]
    labels = [IGNORE] * keep_prompt + labels[:keep_response]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def make_examples(kind: str, rows: list[dict[str, Any]], tokenizer, max_length: int | None = None
                  ) -> list[dict[str, Any]]:
    """The dataset class for a task kind ("classification" or "causal-lm") over `rows`."""
    if kind not in DEFAULT_MAX_LENGTH:
        raise ValueError(f"task kind must be 'classification' or 'causal-lm', got {kind!r}")
    cls = ClassificationDataset if kind == "classification" else ChatDataset
    return cls(rows, tokenizer, max_length or DEFAULT_MAX_LENGTH[kind])


def make_dataset(task: Task, tokenizer, max_length: int | None = None, split: str = "train"
                 ) -> list[dict[str, Any]]:
    """Tokenised examples of one split ("train" or "test") of a Task."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return make_examples(task.kind, getattr(task, split), tokenizer, max_length)


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (pad_token_id), attention_mask (0), labels.

    Int labels (classification) become a [B] tensor; label sequences (LM) are padded with -100.
    """
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.as_tensor(b["input_ids"])
        mask[i, :n] = torch.as_tensor(b["attention_mask"]) if "attention_mask" in b else 1
    out = {"input_ids": ids, "attention_mask": mask}
    if "labels" not in batch[0]:
        return out
    if isinstance(batch[0]["labels"], list | tuple | torch.Tensor):
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.as_tensor(b["labels"])
        out["labels"] = labels
    else:
        out["labels"] = torch.tensor([int(b["labels"]) for b in batch])
    return out
