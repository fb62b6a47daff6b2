"""Multi-task classification with one head per task: each row's logits and loss are its own task head's
on the encoder's pooled features (computed here through the encoder directly), and Trainer and evaluate
train and score it with a LoRA adapter."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import loralab as ll
from loralab.train.multitask import MultiTaskClassifier, collate_tasks, with_task
from loralab.train.trainer import TrainConfig, Trainer, evaluate


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config).eval()


def heads() -> dict[str, nn.Module]:
    torch.manual_seed(1)
    return {"two": nn.Linear(16, 2), "four": nn.Linear(16, 4)}


def test_each_row_gets_its_task_heads_logits_and_loss():
    model, task_heads = tiny_bert(), heads()
    ids = torch.randint(1, 40, (5, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    task = torch.tensor([0, 1, 1, 0, 1])
    labels = torch.tensor([1, 3, 0, 0, 2])
    pooled = model.bert(input_ids=ids, attention_mask=mask).pooler_output  # what the classifier reads
    out = MultiTaskClassifier(model, task_heads)(ids, mask, labels, task)
    losses = []
    for row, t in enumerate(task.tolist()):
        head = list(task_heads.values())[t]
        want = head(pooled[row])
        torch.testing.assert_close(out.logits[row, : len(want)], want)
        assert torch.isneginf(out.logits[row, len(want):]).all()
        losses.append(F.cross_entropy(want[None], labels[row:row + 1]))
    torch.testing.assert_close(out.loss, torch.stack(losses).mean())
    out.loss.backward()
    grads = [h.weight.grad for h in task_heads.values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_labels_outside_the_task_and_unknown_tasks_are_refused():
    wrapped = MultiTaskClassifier(tiny_bert(), heads())
    ids = torch.randint(1, 40, (2, 5))
    with pytest.raises(ValueError, match="outside its task's classes"):
        wrapped(ids, labels=torch.tensor([3, 0]), task=torch.tensor([0, 1]))  # class 3 of the 2-class task
    with pytest.raises(ValueError, match="task indices must be in"):
        wrapped(ids, labels=torch.tensor([0, 0]), task=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no classification head"):
        MultiTaskClassifier(nn.Linear(3, 3), heads())
    with pytest.raises(ValueError, match="no 'task' index"):
        collate_tasks([{"input_ids": [1, 2], "labels": 0}], pad_token_id=0)


def test_trainer_and_evaluate_fit_two_tasks_through_one_adapter():
    model, task_heads = tiny_bert(), heads()
    ll.add_adapter(model, ll.AdapterSpec(r=4, alpha=8, targets=["query", "value"]))
    wrapped = MultiTaskClassifier(model, task_heads)
    g = torch.Generator().manual_seed(0)
    data = {}
    for t, classes in enumerate((2, 4)):  # class c draws its tokens from range 1 + 9c … 9 + 9c
        labels = torch.randint(0, classes, (96,), generator=g)
        ids = 1 + 9 * labels[:, None] + torch.randint(0, 9, (96, 6), generator=g)
        data[t] = with_task([{"input_ids": row.tolist(), "labels": int(y)} for row, y in zip(ids, labels)], t)
    collate_fn = partial(collate_tasks, pad_token_id=0)
    mixed = data[0] + data[1]
    before = evaluate(wrapped, mixed, "classification", collate_fn=collate_fn)
    config = TrainConfig(lr=3e-2, batch_size=16, max_steps=150, progress=False, seed=0)
    Trainer(wrapped, mixed, config=config, collate_fn=collate_fn).train()
    after = [evaluate(wrapped, data[t], "classification", collate_fn=collate_fn)["accuracy"] for t in (0, 1)]
    assert evaluate(wrapped, mixed, "classification", collate_fn=collate_fn)["loss"] < before["loss"] / 2
    assert min(after) > 0.8
