"""`loralab compare`: the fair comparison of "A Unified Study of LoRA Variants" — every method gets
the same data, the same number of steps and the same evaluation, and a small learning-rate
sweep of its own (the learning rate is the most sensitive knob).

The sweep is centred on each method's `suggested_lr`; the best learning rate is chosen on a
dev split held out from the training rows, and while it lies at the edge of the rates tried the
sweep goes on past that edge (up to `extend` more rates, along the same 1-3-10 ladder), so a
method whose suggested rate is off is not judged at a rate it would not be trained at. The
A method may be given with options as a variant of its own row, "uni-lora:start=uniform". The
table reports the test metric at the best rate (marked when it is still at an edge), the
trainable parameters, the median step time and the activation memory a training step keeps for
backward. Results go to results.csv, results.md and results.png, rewritten after each method,
with the run's settings in settings.json; `resume=True` keeps the rows already there (when the
settings match) and runs only the methods still missing.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from loralab.devices import resolve_device
from loralab.methods.base import METHODS
from loralab.model import add_adapter, trainable_parameters
from loralab.profiling import saved_tensor_megabytes
from loralab.spec import AdapterSpec, option_value
from loralab.train.data import collate, make_examples
from loralab.train.recipes import DataSpec, load_data, load_model_for, with_head
from loralab.train.trainer import TrainConfig, Trainer, compute_loss, evaluate

GRIDS = {1: [1.0], 3: [0.3, 1.0, 3.0], 5: [0.1, 0.3, 1.0, 3.0, 10.0]}


@dataclass
class Row:
    method: str
    best_lr: float
    dev_metric: float
    test_metric: float
    trainable_params: int
    step_ms: float
    activation_mb: float
    lr_at_edge: bool = False  # the best rate is still the lowest or highest tried


def next_rate(factor: float, up: bool) -> float:
    """The next point past `factor` on the 1-3-10 ladder the grids are cut from (…, 0.3, 1, 3, 10, …)."""
    ones = round(factor / 10 ** math.floor(math.log10(factor) + 1e-9)) == 1
    step = 3.0 if ones == up else 10 / 3
    return factor * step if up else factor / step


def sweep(score: Callable[[float], float], grid: list[float], extend: int) -> tuple[float, bool, dict[float, float]]:
    """Scores `grid`, then while the best factor is the lowest or highest tried (and fewer than
    `extend` extra ones were tried) also the next one past it. Returns (best factor, whether it is
    still at an edge, every factor's score)."""
    scores = {f: score(f) for f in grid}
    for _ in range(extend if len(grid) > 1 else 0):
        best = max(scores, key=scores.__getitem__)
        if min(scores) < best < max(scores):
            break
        factor = next_rate(best, up=best == max(scores))
        scores[factor] = score(factor)
    best = max(scores, key=scores.__getitem__)
    return best, len(scores) > 1 and best in (min(scores), max(scores)), scores


def parse_variant(entry: str) -> tuple[str, dict]:
    """A `methods` entry: a method name, or a variant with options, "uni-lora:start=uniform:dim=2048"
    (values read as JSON where they can be: numbers, true/false), checked against the method's options."""
    name, *pairs = entry.split(":")
    cls = METHODS.get(name)  # an unknown name lists close matches
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method variant {entry!r}: {pair!r} is not key=value")
        if key not in cls.option_defaults:
            allowed = ", ".join(sorted(cls.option_defaults)) or "none"
            raise ValueError(f"method variant {entry!r}: {name} has no option {key!r}; it takes: {allowed}")
        options[key] = option_value(value)
    return name, options


def compare(base: str, task: str, methods: list[str], out_dir: str, budget: int = 100, lr_grid: int = 3,
            r: int = 8, batch_size: int = 16, max_train: int = 3000, dev_size: int = 300, max_test: int | None = None,
            seed: int = 0, progress: bool = True, resume: bool = False, extend: int = 2, device: str = "auto",
            precision: str = "fp32") -> list[Row]:
    if lr_grid not in GRIDS:
        raise ValueError(f"lr_grid must be one of {sorted(GRIDS)}, got {lr_grid}")
    variants = {m: parse_variant(m) for m in methods}  # unknown names and options fail before any training
    settings = {"base": base, "task": task, "budget": budget, "lr_grid": lr_grid, "r": r, "batch_size": batch_size,
                "max_train": max_train, "dev_size": dev_size, "max_test": max_test, "seed": seed, "extend": extend,
                "device": resolve_device(device).type, "precision": precision}
    rows = previous_rows(Path(out_dir), settings) if resume else []
    done = {row.method for row in rows}
    if progress and done:
        print(f"resuming: {len(done)} methods already in {out_dir} ({', '.join(sorted(done))})")
    methods = [m for m in methods if m not in done]
    if not methods:
        return rows
    data = load_data(DataSpec(task=task, max_train=max_train + dev_size, max_test=max_test))
    if data.kind != "classification":
        raise ValueError("compare reports accuracy: choose a classification task (sst2, agnews)")
    torch.manual_seed(seed)  # the fresh classifier head: every method and every run of compare starts from the same one
    base_model, tok = load_model_for(base, data, device)
    train = make_examples(data.kind, data.train[:max_train], tok, 128)
    dev = make_examples(data.kind, data.train[max_train:], tok, 128)
    test = make_examples(data.kind, data.test, tok, 128)
    pad = partial(collate, pad_token_id=tok.pad_token_id)
    for entry in methods:
        method, options = variants[entry]
        centre = METHODS.get(method).suggested_lr
        kept: dict = {}  # only the best run so far keeps its model (a sweep may train five)

        def run(factor: float, method: str = method, options: dict = options, centre: float = centre,
                kept: dict = kept) -> float:
            model = copy.deepcopy(base_model)
            torch.manual_seed(seed)
            spec = AdapterSpec(method=method, r=r, alpha=2 * r, targets="all-linear", options=options)
            add_adapter(model, with_head(spec, model, data))
            config = TrainConfig(lr=centre * factor, batch_size=batch_size, max_steps=budget,
                                 warmup_steps=budget // 10, seed=seed, progress=progress, log_every=budget,
                                 rank_schedule=METHODS.get(method).rank_schedule, precision=precision)
            trainer = Trainer(model, train, None, config, pad_token_id=tok.pad_token_id)
            trainer.train()
            score = evaluate(model, dev, data.kind, 128, pad, precision=precision)["accuracy"]
            if not kept or score > kept["score"]:  # strict: the first of equal scores wins, as in sweep()
                kept.update(score=score, model=model, trainer=trainer)
            return score

        factor, at_edge, scores = sweep(run, GRIDS[lr_grid], extend)
        model, trainer, score, lr = kept["model"], kept["trainer"], scores[factor], centre * factor
        batch = trainer.to_device(pad(train[:batch_size]))
        model.train()
        memory = saved_tensor_megabytes(lambda m=model, b=batch: compute_loss(m, b, data.kind)[0])
        step_ms = 1000 * trainer.history[-1]["elapsed_s"] / budget
        rows.append(Row(entry, lr, score, evaluate(model, test, data.kind, 128, pad, precision=precision)["accuracy"],
                        trainable_parameters(model).trainable, step_ms, memory, at_edge))
        write_results(rows, Path(out_dir), f"{task} accuracy", settings)  # a cut-off run keeps its rows
        if progress:
            print(f"{entry}: test accuracy {rows[-1].test_metric:.4f} at lr {lr:g}")
    return rows


def previous_rows(out: Path, settings: dict) -> list[Row]:
    """The rows of an earlier run in `out`, refused when that run used other settings."""
    if not (out / "results.csv").exists():
        return []
    saved = json.loads((out / "settings.json").read_text()) if (out / "settings.json").exists() else {}
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
    if differ:
        raise ValueError(f"cannot resume the comparison in {out}: its settings differ ({'; '.join(differ)}); "
                         "use another --out or the same settings")
    with open(out / "results.csv", newline="") as f:
        return [Row(r["method"], *(float(r[k]) for k in ("best_lr", "dev_metric", "test_metric")),
                    int(r["trainable_params"]), float(r["step_ms"]), float(r["activation_mb"]),
                    r.get("lr_at_edge") == "True")
                for r in csv.DictReader(f)]


def markdown(rows: list[Row], metric: str) -> str:
    head = f"| method | {metric} (test) | dev | best lr | trainable params | step (ms) | activations (MB) |\n"
    head += "|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {r.method} | {r.test_metric:.4f} | {r.dev_metric:.4f} | {r.best_lr:g}{' (edge)' * r.lr_at_edge} "
                   f"| {r.trainable_params:,} | {r.step_ms:.0f} | {r.activation_mb:.0f} |\n"
                   for r in sorted(rows, key=lambda r: -r.test_metric))
    return head + body


def write_results(rows: list[Row], out: Path, metric: str, settings: dict) -> None:
    from loralab.checkpoint import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "settings.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)

    atomic_write(out / "results.csv", write_csv)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown(rows, metric)))
    plot(rows, out / "results.png", metric)


def plot(rows: list[Row], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r.trainable_params, r.test_metric, s=40)
        ax.annotate(r.method, (r.trainable_params, r.test_metric), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale, classifier head included)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs. trainable parameters (best lr of each method's sweep)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

