"""The training loop: AdamW (or any registered optimiser), warm-up + decay, accumulation, clipping,
periodic evaluation, atomic checkpoints with exact resume, a progress bar, a JSONL log, and
data parallelism under torchrun (DDP; gloo on CPU).

Exact resume: the data order is a seeded permutation per epoch and the loop tracks
(epoch, position) itself, and every checkpoint holds the trainable parameters, optimiser and
scheduler state, the rank schedule's state and all RNG states, so a resumed run takes the same
steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from loralab.devices import PRECISIONS, autocast, grad_scaler
from loralab.methods.base import AdapterMethod
from loralab.model import adapted_layers
from loralab.train.data import collate
from loralab.train.optim import get_optimizer

SCHEDULES = ("linear", "cosine", "constant")
KINDS = ("classification", "causal-lm")


@dataclass
class TrainConfig:
    task_kind: str = "classification"  # or "causal-lm"
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # e.g. LoRA+'s ratio
    rank_schedule: str | None = None  # e.g. "adalora", "dylora", "sora", "increlora"
    rank_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16  # examples per optimiser step and micro-step, over all processes
    grad_accum: int = 1
    max_steps: int = 100  # optimiser steps
    warmup_steps: int = 0
    schedule: str = "linear"  # after warm-up: linear decay to 0, cosine, or constant
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # 0: only at the end
    eval_batch_size: int = 64
    max_eval_batches: int | None = None  # cap on each evaluation (None: the whole set)
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    out_dir: str | None = None
    keep_last: int = 2
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    precision: str = "fp32"  # or "bf16" / "fp16": mixed precision (autocast); fp16 adds loss scaling
    compile: bool = False  # torch.compile the training forward and backward (evaluation stays eager)
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward (transformers models)

    def validate(self) -> None:
        checks = [(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
                  (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                  (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                  (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
                  (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
                  (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
                  (self.eval_every >= 0 and self.save_every >= 0,
                   f"eval_every and save_every must be >= 0 (0: only at the end), got {self.eval_every}, "
                   f"{self.save_every}"),
                  (self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}"),
                  (self.max_eval_batches is None or self.max_eval_batches >= 1,
                   f"max_eval_batches must be >= 1 or None, got {self.max_eval_batches}"),
                  (self.schedule in SCHEDULES,
                   f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
                  (self.task_kind in KINDS, f"task_kind must be one of {', '.join(KINDS)}, got {self.task_kind!r}"),
                  (self.precision in PRECISIONS,
                   f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, logits) from a HF-style model; the loss is computed from logits when absent."""
    out = model(**batch)
    logits = out if torch.is_tensor(out) else out.logits
    loss = None if torch.is_tensor(out) else getattr(out, "loss", None)
    if loss is None:
        labels = batch["labels"]
        if kind == "classification":
            loss = F.cross_entropy(logits.float(), labels)
        else:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return loss + auxiliary_losses(model), logits


def auxiliary_losses(model: nn.Module) -> torch.Tensor | float:
    """Sum (and reset) the extra losses adapter methods recorded in this forward, e.g. a router's
    load-balancing loss (LoRAMoE)."""
    total: torch.Tensor | float = 0.0
    for m in model.modules():
        if isinstance(m, AdapterMethod) and m.aux_loss is not None:
            total = total + m.aux_loss
            m.aux_loss = None
    return total


def check_adapter_dtypes(model: nn.Module, precision: str) -> None:
    """Adapter tensors in another dtype than their base weights (add_adapter(dtype=...)) need autocast."""
    if precision != "fp32":
        return
    for path, layer in adapted_layers(model):
        for name, method in layer.adapters.items():
            kept = {p.dtype for p in method.parameters() if p.requires_grad} - {layer.kind.weight.dtype}
            if kept:
                raise ValueError(f"adapter {name!r} at {path} keeps {kept.pop()} tensors over "
                                 f"{layer.kind.weight.dtype} base weights: train with precision='bf16' or 'fp16' "
                                 "(--precision), which runs the products under autocast")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each transformer block's input for the backward and recompute the rest there: far
    less activation memory for one more forward of every block (transformers' gradient checkpointing,
    non-reentrant, so no input needs requires_grad and the adapters' steps are recomputed exactly)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient checkpointing needs a transformers model whose class supports it; "
                         f"{type(model).__name__} does not")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Trainer:
    """Train `model`'s trainable parameters on a list of tokenised examples."""

    def __init__(self, model: nn.Module, train_data: list[dict[str, Any]],
                 eval_data: list[dict[str, Any]] | None = None, config: TrainConfig | None = None,
                 collate_fn: Callable[[list], dict] | None = None,
                 optimizer_factory: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer] | None = None,
                 callbacks: Iterable[Any] = (), on_save: Callable[[Trainer, Path], None] | None = None,
                 pad_token_id: int = 0) -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        if not train_data:
            raise ValueError("the training data is empty")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters: add an adapter (loralab.add_adapter) "
                             "or unfreeze something first")
        check_adapter_dtypes(model, self.config.precision)
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model
        self.train_data = list(train_data)
        self.eval_data = list(eval_data) if eval_data else None
        self.collate = collate_fn or partial(collate, pad_token_id=pad_token_id)
        self.callbacks = list(callbacks)
        self.rank_schedule = None
        if self.config.rank_schedule:
            from loralab.train.rank import get_rank_schedule

            self.rank_schedule = get_rank_schedule(self.config.rank_schedule)(model, self.config)
            self.callbacks.append(self.rank_schedule)
        self.on_save = on_save
        self.device = next(model.parameters()).device
        self.rank, self.world = _distributed(self.device)
        if self.config.batch_size % self.world:
            raise ValueError(f"batch_size {self.config.batch_size} must divide by the {self.world} processes")
        engine = _wrap_ddp(model) if self.world > 1 else model
        self.engine = torch.compile(engine) if self.config.compile else engine
        self.scaler = grad_scaler(self.device, self.config.precision)
        self.optimizer_factory = optimizer_factory or get_optimizer(self.config.optimizer)
        self.step = 0
        self.rebuild_optimizer()
        self.epoch = 0
        self.position = 0
        self.history: list[dict[str, Any]] = []
        self.out_dir = Path(self.config.out_dir) if self.config.out_dir else None
        self._saved_step = -1

    # ---- data ------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=g).tolist()

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next global batch's share for this process; epochs roll over in place."""
        size = self.config.batch_size
        order = self._order(self.epoch)
        if self.position + size > len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order(self.epoch)
        picked = order[self.position:self.position + size]
        self.position += size
        share = size // self.world
        mine = picked[self.rank * share:(self.rank + 1) * share]
        return self.to_device(self.collate([self.train_data[i] for i in mine]))

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's tensors on the model's device."""
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- the loop --------------------------------------------------------------------------
    def rebuild_optimizer(self) -> None:
        """A fresh optimiser over the current trainable parameters, its schedule at the current step
        (after a rank schedule replaced parameters, e.g. LoRA-Squeeze)."""
        self.optimizer = self.optimizer_factory(self.model, self.config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(lr_factor, config=self.config))
        with warnings.catch_warnings():  # stepping the schedule forward before any optimiser step is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.step):
                self.scheduler.step()

    def notify(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            if hasattr(cb, event):
                getattr(cb, event)(self, *args)

    def train(self, resume_from: str | os.PathLike | None = None) -> dict[str, Any]:
        """Run to max_steps; returns the final evaluation (and the last training loss).

        Ctrl-C saves a checkpoint of the last completed step (when out_dir is set) and re-raises.
        """
        if resume_from is not None:
            self.load_checkpoint(self._resolve_resume(resume_from))
        cfg = self.config
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not cfg.progress or self.rank != 0,
                   dynamic_ncols=True)
        meter, last_loss = _Throughput(), float("nan")
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                logs = self._train_step(meter)
                last_loss = logs["loss"]
                bar.update(1)
                speed = (f"{logs['tokens_per_s']:.0f} tok/s" if cfg.task_kind == "causal-lm"
                         else f"{logs['examples_per_s']:.1f} ex/s")
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}", speed=speed)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self._evaluate_and_log()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            result = self._evaluate_and_log() if self.eval_data else {}
        except KeyboardInterrupt:
            bar.close()
            self._save_interrupted()
            raise
        bar.close()
        result["train_loss"] = last_loss
        if self.out_dir is not None:
            self.save_checkpoint()
        self.notify("on_train_end")
        return result

    def _train_step(self, meter: _Throughput) -> dict[str, Any]:
        """One optimiser step and its logs. Interrupted before its update, it rewinds the data cursor and
        the RNG to the start of the step, so the checkpoint Ctrl-C takes is the last completed step exactly."""
        step, epoch, position, rng = self.step, self.epoch, self.position, _rng_state()
        try:
            loss_sum, examples, tokens = self._accumulate()
            with _sigint_deferred():  # the update and its bookkeeping happen whole or not at all
                logs = self._update()
                logs.update(loss=_mean_over_ranks(loss_sum, self.world), **meter.add(examples, tokens))
                if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
                    self._log(logs)
                self.notify("on_step_end", self.step, logs)
            return logs
        except KeyboardInterrupt:
            if self.step == step:
                self.epoch, self.position = epoch, position
                _set_rng_state(rng)
                self.optimizer.zero_grad(set_to_none=True)
            raise

    def _accumulate(self) -> tuple[float, int, int]:
        """Forward and backward over grad_accum micro-batches: (mean loss here, examples, tokens over all processes)."""
        cfg = self.config
        self.notify("on_step_begin", self.step)
        loss_sum, examples, tokens = 0.0, 0, 0
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.engine.no_sync():
                with autocast(self.device, cfg.precision):
                    loss, _ = compute_loss(self.engine, batch, cfg.task_kind)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            examples += batch["input_ids"].shape[0] * self.world
            tokens += int(batch["attention_mask"].sum()) * self.world if "attention_mask" in batch else 0
        return loss_sum, examples, tokens

    def _update(self) -> dict[str, Any]:
        """Clip, step the optimiser and the schedule; the logs of the step (lr: the rate it used)."""
        self.scaler.unscale_(self.optimizer)  # rank schedules and clipping see the true gradients
        self.notify("on_before_step")
        grad_norm = self._clip()
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "lr": lr, "grad_norm": grad_norm}

    def _save_interrupted(self) -> None:
        if self.out_dir is None or self.step == 0:
            if self.rank == 0:
                print(f"\ninterrupted at step {self.step}; nothing saved "
                      f"({'no out_dir set' if self.out_dir is None else 'no step completed'}).", file=sys.stderr)
            return
        path = self.save_checkpoint()
        if self.rank == 0:
            print(f"\ninterrupted at step {self.step}; checkpoint saved in {path}. "
                  f"Resume with --resume (train(resume_from='latest')).", file=sys.stderr)

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.max_grad_norm is None:
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))

    def _evaluate_and_log(self) -> dict[str, Any]:
        metrics = self.evaluate()
        self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        self.notify("on_evaluate", self.step, metrics)
        return metrics

    def evaluate(self, data: list[dict[str, Any]] | None = None) -> dict[str, float]:
        """classification: accuracy and loss; causal-lm: loss and perplexity (token-weighted)."""
        data = data if data is not None else self.eval_data
        if not data:
            raise ValueError("no evaluation data")
        return evaluate(self.model, data, self.config.task_kind, self.config.eval_batch_size, self.collate,
                        self.rank, self.world, max_batches=self.config.max_eval_batches,
                        precision=self.config.precision)

    # ---- logs and checkpoints --------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is None or self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> Path | None:
        """Write out_dir/checkpoint-<step>/ atomically (temp folder, then rename); keep the newest keep_last."""
        if self.out_dir is None:
            raise ValueError("set TrainConfig.out_dir to save checkpoints")
        final = self.out_dir / f"checkpoint-{self.step}"
        if self._saved_step == self.step and final.exists():
            return final
        self._saved_step = self.step
        if self.rank != 0:
            return final
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{self.step}.", dir=self.out_dir))
        try:
            trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": _rng_state(), "scaler": self.scaler.state_dict(),
                        "rank_schedule": self.rank_schedule.state_dict() if self.rank_schedule else None},
                       tmp / "state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "epoch": self.epoch, "position": self.position,
                 "config": asdict(self.config)}, indent=2))
            if self.on_save is not None:
                self.on_save(self, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def checkpoints(self) -> list[Path]:
        if self.out_dir is None or not self.out_dir.is_dir():
            return []
        found = [p for p in self.out_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def _resolve_resume(self, resume_from: str | os.PathLike) -> Path:
        if str(resume_from) == "latest":
            found = self.checkpoints()
            if not found:
                raise FileNotFoundError(f"no checkpoint to resume in {self.out_dir}")
            return found[-1]
        return Path(resume_from)

    def load_checkpoint(self, path: Path) -> None:
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint (no trainer_state.json)")
        meta = json.loads(state_file.read_text())
        saved_schedule = meta["config"].get("rank_schedule")
        if saved_schedule != self.config.rank_schedule:
            raise ValueError(f"checkpoint {path} was trained with rank_schedule={saved_schedule!r}, this run has "
                             f"{self.config.rank_schedule!r}: resume with the same rank schedule")
        state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")  # any device resumes it
        if self.rank_schedule is not None:  # first: a schedule may have reshaped parameters (LoRA-Squeeze)
            self.rank_schedule.load_state_dict(state["rank_schedule"])
            self.rebuild_optimizer()
        params = dict(self.model.named_parameters())
        saved = load_file(str(path / "trainable.safetensors"))
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
        if missing:
            raise ValueError(f"checkpoint {path} lacks trainable parameters: {missing[:3]}")
        with torch.no_grad():
            for name, t in saved.items():
                params[name].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step, self.epoch, self.position = meta["step"], meta["epoch"], meta["position"]
        self._saved_step = self.step


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict[str, Any]], kind: str, batch_size: int = 64,
             collate_fn: Callable[[list], dict] | None = None, rank: int = 0, world: int = 1,
             progress: bool = False, max_batches: int | None = None, precision: str = "fp32") -> dict[str, float]:
    """classification: {"accuracy", "loss"}; causal-lm: {"loss", "perplexity"} (token-weighted).

    `max_batches` keeps the first max_batches·batch_size examples. Under torchrun each process
    takes every world-th example and the sums are all-reduced.
    """
    if max_batches is not None:
        examples = examples[:max_batches * batch_size]
    collate_fn = collate_fn or partial(collate, pad_token_id=0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shard = sorted(examples[rank::world], key=lambda e: len(e["input_ids"]))  # less padding
    loss_total = correct = count = 0.0
    for i in tqdm(range(0, len(shard), batch_size), desc="eval", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate_fn(shard[i:i + batch_size]).items()}
        with autocast(device, precision):
            loss, logits = compute_loss(model, batch, kind)
        if kind == "classification":
            n = batch["labels"].numel()
            correct += float((logits.argmax(-1) == batch["labels"]).sum())
        else:
            n = float((batch["labels"][:, 1:] != -100).sum())
        loss_total += float(loss) * n
        count += n
    loss_total, correct, count = _sum_over_ranks([loss_total, correct, count], world)
    model.train(was_training)
    mean_loss = loss_total / max(count, 1)
    if kind == "classification":
        return {"accuracy": correct / max(count, 1), "loss": mean_loss}
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50))}


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Throughput:
    """Examples and tokens seen since training (re)started, as rates."""

    start: float = field(default_factory=time.perf_counter)
    examples: int = 0
    tokens: int = 0

    def add(self, examples: int, tokens: int) -> dict[str, float]:
        self.examples += examples
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        return {"examples_per_s": self.examples / elapsed, "tokens_per_s": self.tokens / elapsed, "elapsed_s": elapsed}


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C until the block ends, then raise KeyboardInterrupt (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


# ---- torchrun --------------------------------------------------------------------------------
def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (nccl for a model on a GPU, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _wrap_ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_over_ranks(value: float, world: int) -> float:
    return _sum_over_ranks([value], world)[0] / world


def _sum_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()

