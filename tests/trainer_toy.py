"""A tiny learnable task for trainer tests: label = whether token 1 occurs in the sequence."""

from __future__ import annotations

import torch
from torch import nn

import loralab as ll


class Toy(nn.Module):
    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.hidden = nn.Linear(16, 16)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.drop(torch.tanh(self.hidden(self.embed(input_ids)))).mean(1)
        return self.head(h)


def examples(n: int = 256, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 20, (6,), generator=g)
        label = int(torch.rand(1, generator=g) < 0.5)
        if label:
            ids[torch.randint(0, 6, (1,), generator=g)] = 1
        out.append({"input_ids": ids.tolist(), "labels": label})
    return out


def adapted_toy(dropout: float = 0.2) -> Toy:
    model = Toy(dropout)
    ll.add_adapter(model, ll.AdapterSpec(r=4, alpha=8, targets=["hidden"], modules_to_save=["head"]))
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
