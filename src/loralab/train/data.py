"""Tokenised examples and padded batches for classification and instruction (chat) tuning.

Chat examples use the tokenizer's own chat template; the labels are -100 on every prompt
and template token, so the loss falls on the response (and its end-of-turn token) only.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def classification_examples(rows: list[dict[str, Any]], tokenizer, max_length: int = 128) -> list[dict[str, Any]]:
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": int(r["label"])} for ids, r in zip(enc["input_ids"], rows)]


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it before its answer (chat template, or a plain fallback)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"### Question:\n{prompt}\n\n### Answer:\n"


def _chat_full(tokenizer, prompt: str, response: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
    return chat_prompt(tokenizer, prompt) + response + (tokenizer.eos_token or "")


def chat_examples(rows: list[dict[str, Any]], tokenizer, max_length: int = 512) -> list[dict[str, Any]]:
    """input_ids of prompt + response; labels copy the response tokens, -100 elsewhere.

    Too-long examples lose prompt tokens from the left first; the response is kept whole
    where it fits, else cut at the end.
    """
    prompts = [chat_prompt(tokenizer, r["prompt"]) for r in rows]
    fulls = [_chat_full(tokenizer, r["prompt"], r["response"]) for r in rows]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    out = []
    for prompt, full in zip(p_ids, f_ids):
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template tokenises the prompt differently inside the full conversation; "
                             "cannot tell prompt tokens from response tokens")
        response = full[len(prompt):]
        trailing = _trailing_template(tokenizer, response)
        labels_response = response[: len(response) - trailing] + [IGNORE] * trailing
        keep_prompt = max(0, min(len(prompt), max_length - len(response)))
        ids = prompt[len(prompt) - keep_prompt:] + response
        labels = [IGNORE] * keep_prompt + labels_response
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return out


def _trailing_template(tokenizer, response: list[int]) -> int:
    """Tokens after the end-of-turn marker (e.g. a newline the template appends): not trained on."""
    eos = tokenizer.eos_token_id
    if eos is None or eos not in response:
        return 0
    last = len(response) - 1 - response[::-1].index(eos)
    return len(response) - 1 - last


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding for LM labels)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, : len(b["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if isinstance(batch[0]["labels"], int):
        out["labels"] = torch.tensor([b["labels"] for b in batch])
    else:
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
        out["labels"] = labels
    return out


def make_examples(kind: str, rows: list[dict[str, Any]], tokenizer, max_length: int) -> list[dict[str, Any]]:
    if kind == "classification":
        return classification_examples(rows, tokenizer, max_length)
    if kind == "causal-lm":
        return chat_examples(rows, tokenizer, max_length)
    raise ValueError(f"task kind must be 'classification' or 'causal-lm', got {kind!r}")
