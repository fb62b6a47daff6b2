"""Combining two task adapters on real data: one LoRA adapter per task (SST-2, AG News) on the embedded
MiniLM-L6 encoder, then every merge method of loralab.compose (task arithmetic arXiv 2212.04089, TIES
2306.01708, DARE 2311.03099, LoRA-LEGO 2409.16167, …) and the routers (Arrow over the frozen adapters, untrained,
arXiv 2405.11157; a MeteoRA-style gate over them, arXiv 2405.13053; LoRAMoE trained multi-task, arXiv
2312.09979), each scored on both
test sets. Prints the table and writes it to OUT/table.md.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/two_task_table.py

Heads: every task keeps its own linear classifier outside the adapters (train/multitask.py), so
adapters merge as pure LoRA factors. The single-task adapters train theirs (a fresh head each), and
every merge, Arrow and the MeteoRA gate use those; LoRAMoE trains its own pair with its experts; the base
row is a linear probe (heads only, trained on the frozen encoder). Multi-task runs draw batches from
an equal mix of both tasks, each row scored by its task's head.
"""

from __future__ import annotations

import argparse
import random
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

import loralab as ll
from loralab.compose import add_arrow, add_router, combine_folders, list_merge_methods
from loralab.train.data import make_examples
from loralab.train.multitask import MultiTaskClassifier, collate_tasks, with_task
from loralab.train.trainer import TrainConfig, Trainer, evaluate
from loralab.zoo import load_base, load_task

TASKS = {"sst2": "SST-2", "agnews": "AG News"}
# every linear of the encoder: attention (query, key, value, output), feed-forward, and the pooler that feeds
# the heads (without it, SST-2 stayed at chance in 200 steps in one of two runs)
TARGETS = r"bert\..*(query|key|value|dense)"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per single-task adapter and for the "
                   "linear probe; LoRAMoE takes twice as many, so each task sees as many examples")
    p.add_argument("--router-steps", type=int, default=150, help="steps for the MeteoRA gate (it alone trains)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-test", type=int, default=1000, help="test rows per task (SST-2 has 872)")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction for ties, dare, magnitude-prune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/two_task")
    return p.parse_args()


class Experiment:
    """One encoder that collects every adapter, the tokenised data, and the scores so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out, self.start = args, Path(args.out), time.perf_counter()
        torch.manual_seed(args.seed)
        self.model, tok = load_base("minilm-l6", task="classification", num_labels=2)
        self.model.requires_grad_(False)
        self.collate = partial(collate_tasks, pad_token_id=tok.pad_token_id)
        self.classes, self.train, self.test = {}, {}, {}
        for name in TASKS:
            task = load_task(name, max_test=args.max_test)
            self.classes[name] = len(task.labels)
            self.train[name] = make_examples("classification", task.train, tok, args.max_length)
            self.test[name] = make_examples("classification", task.test, tok, args.max_length)
        self.rows: list[tuple[str, dict[str, float]]] = []

    def log(self, message: str) -> None:
        print(f"[{(time.perf_counter() - self.start) / 60:5.1f} min] {message}", flush=True)

    def new_heads(self, seed: int) -> dict[str, nn.Module]:
        torch.manual_seed(seed)
        return {name: nn.Linear(self.model.config.hidden_size, n) for name, n in self.classes.items()}

    def mixed(self) -> list[dict]:
        """An equal number of training rows of each task (a seeded sample of the larger), marked by task."""
        n = min(len(rows) for rows in self.train.values())
        rng = random.Random(self.args.seed)
        return [e for i, rows in enumerate(self.train.values()) for e in with_task(rng.sample(rows, n), i)]

    def fit(self, heads: dict[str, nn.Module], data: list[dict], steps: int, what: str) -> None:
        a = self.args
        config = TrainConfig(lr=a.lr, batch_size=a.batch_size, max_steps=steps, warmup_steps=steps // 15,
                             seed=a.seed, log_every=25)
        trainer = Trainer(MultiTaskClassifier(self.model, heads), data, config=config, collate_fn=self.collate)
        self.log(f"training {what}: {steps} steps of {a.batch_size}")
        trainer.train()

    def score(self, label: str, heads: dict[str, nn.Module]) -> None:
        """Accuracy on each task's test rows, through that task's head."""
        wrapped = MultiTaskClassifier(self.model, heads)
        accuracy = {name: evaluate(wrapped, with_task(self.test[name], i), "classification", 128,
                                   self.collate)["accuracy"] for i, name in enumerate(TASKS)}
        self.rows.append((label, accuracy))
        self.log(f"{label:<48} " + "  ".join(f"{TASKS[n]} {v:.3f}" for n, v in accuracy.items()))

    def table(self) -> str:
        lines = ["| combination | " + " | ".join(f"{v} acc" for v in TASKS.values()) + " | mean |",
                 "|---|" + "---|" * (len(TASKS) + 1)]
        for label, accuracy in self.rows:
            values = [accuracy[n] for n in TASKS]
            cells = [f"{v:.3f}" for v in [*values, sum(values) / len(values)]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> str:
    ex = Experiment(args)
    a, names = args, list(TASKS)
    sizes = ", ".join(f"{TASKS[n]} {len(ex.train[n])} train / {len(ex.test[n])} test" for n in names)
    ex.log(f"minilm-l6, LoRA r={a.r} on the attention, FFN and pooler linears; {sizes}; max_length {a.max_length}")
    mixed = ex.mixed()

    probe = ex.new_heads(a.seed + 1)  # the base row: heads trained on the frozen encoder
    for head in probe.values():
        head.requires_grad_(True)
    ex.fit(probe, mixed, a.steps, "linear probe (heads only, no adapter)")
    ex.score("base + linear-probe heads (no adapter)", probe)

    heads = ex.new_heads(a.seed + 2)  # trained with their task's adapter; every merge and the gate use them
    folders = {}
    for name in names:
        ll.add_adapter(ex.model, ll.AdapterSpec(r=a.r, alpha=2 * a.r, targets=TARGETS), name=name)
        ex.fit({name: heads[name]}, with_task(ex.train[name], 0), a.steps, f"{TASKS[name]} adapter + head")
        folders[name] = ll.save_adapter(ex.model, ex.out / "adapters" / name, name=name)
    for head in heads.values():
        head.requires_grad_(False)
    for name in names:
        ll.set_active(ex.model, name)
        ex.score(f"{TASKS[name]} adapter alone", heads)

    for method in list_merge_methods():
        folder = combine_folders(list(folders.values()), ex.out / "merged" / method, method=method,
                                 density=a.density, seed=a.seed)
        ll.load_adapter(ex.model, folder, name="merged")
        rank = ll.get_spec(ex.model, "merged").r
        ex.score(f"merge: {method} (rank {rank})", heads)
        ll.remove_adapter(ex.model, "merged")

    for k in (1, 2):  # nothing trains: the heads are the single-task adapters'
        add_arrow(ex.model, names, name="arrow", top_k=k)
        ex.score(f"router: Arrow, top-{k} of the 2 adapters (untrained)", heads)
        ll.remove_adapter(ex.model, "arrow")

    add_router(ex.model, names, name="gate", top_k=2)
    ex.fit(heads, mixed, a.router_steps, "MeteoRA-style gate over the frozen adapters")
    ex.score("router: MeteoRA gate, top-2 of the 2 adapters", heads)

    moe_spec = ll.AdapterSpec(method="loramoe", r=a.r, alpha=2 * a.r, targets=TARGETS,
                              options={"experts": 2, "top_k": 2})
    ll.add_adapter(ex.model, moe_spec, name="moe")
    moe_heads = ex.new_heads(a.seed + 3)
    ex.fit(moe_heads, mixed, 2 * a.steps, "LoRAMoE (2 experts, top-2) + heads, multi-task")
    ex.score("LoRAMoE, 2 experts top-2, trained multi-task", moe_heads)

    table = ex.table()
    ex.out.mkdir(parents=True, exist_ok=True)
    (ex.out / "table.md").write_text(table)
    print("\n" + table)
    ex.log(f"done; table in {ex.out / 'table.md'}")
    return table


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(parse())
