"""Several classification tasks on one (adapted) encoder, each task with its own head: hard parameter
sharing as in MT-DNN (Liu et al., arXiv 1901.11504). A batch may mix rows of different tasks.

`MultiTaskClassifier(model, {"sst2": head2, "agnews": head4})` replaces a sequence-classification
model's head (`classifier` or `score`) by the identity, so the model returns the features its head
read, and applies each row's task head to them. Rows carry the index of their task in `heads`
(`with_task`, `collate_tasks`). The logits are padded to the widest head with -inf: argmax then
picks within the row's task and cross-entropy equals the row's own task loss, so `Trainer` and
`evaluate` take the model as it is. The heads are not part of the adapted model: adding, switching
or merging adapters never freezes or saves them, and several head sets can share one model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from loralab.train.data import collate

HEAD_NAMES = ("classifier", "score")


def with_task(examples: list[dict[str, Any]], task: int) -> list[dict[str, Any]]:
    """The examples, each marked with the index of its task's head."""
    return [{**e, "task": task} for e in examples]


def collate_tasks(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate`, plus the rows' task indices as "task"."""
    missing = sum("task" not in b for b in batch)
    if missing:
        raise ValueError(f"{missing} of {len(batch)} examples have no 'task' index; mark them with with_task")
    return {**collate(batch, pad_token_id), "task": torch.tensor([int(b["task"]) for b in batch])}


class MultiTaskClassifier(nn.Module):
    """`model`'s features, each row through the head of its task (heads: name → module, in index order)."""

    def __init__(self, model: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("MultiTaskClassifier needs at least one task head")
        attr = next((a for a in HEAD_NAMES if isinstance(getattr(model, a, None), nn.Module)), None)
        if attr is None:
            raise ValueError(f"{type(model).__name__} has no classification head ({' or '.join(HEAD_NAMES)}) to "
                             "replace; give a Hugging Face sequence-classification model")
        if not isinstance(getattr(model, attr), nn.Identity):
            setattr(model, attr, nn.Identity())
        self.model = model
        self.heads = nn.ModuleDict(heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, task: torch.Tensor | None = None) -> SequenceClassifierOutput:
        features = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        task = torch.zeros(len(features), dtype=torch.long, device=features.device) if task is None else task
        if task.min() < 0 or task.max() >= len(self.heads):
            raise ValueError(f"task indices must be in [0, {len(self.heads)}) ({', '.join(self.heads)}), "
                             f"got {sorted(set(task.tolist()))}")
        rows = [(task == i).nonzero().squeeze(1) for i in range(len(self.heads))]
        outputs = [head(features[r]) for head, r in zip(self.heads.values(), rows)]
        logits = features.new_full((len(features), max(o.shape[-1] for o in outputs)), float("-inf"))
        for r, out in zip(rows, outputs):
            logits = logits.index_put((r[:, None], torch.arange(out.shape[-1], device=r.device)), out)
        loss = None
        if labels is not None:
            widths = torch.tensor([o.shape[-1] for o in outputs], device=task.device)[task]
            if (labels < 0).any() or (labels >= widths).any():
                sizes = ", ".join(f"{name}: {o.shape[-1]}" for name, o in zip(self.heads, outputs))
                raise ValueError("a label is outside its task's classes: each row's label must be in "
                                 f"[0, classes of its task's head) ({sizes})")
            loss = F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
