"""End-to-end jobs the CLI and the demo run: data → adapter → training → evaluation → saved files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralab.checkpoint import save_adapter
from loralab.inits.base import INITS
from loralab.model import add_adapter, trainable_parameters
from loralab.spec import AdapterSpec
from loralab.train.data import collate, make_examples
from loralab.train.trainer import TrainConfig, Trainer, check_adapter_dtypes, compute_loss, evaluate
from loralab.zoo.datasets import Task, classification_rows, instruction_rows, load_task

HEADS = ("classifier", "score")


@dataclass
class DataSpec:
    """Which data to use: a built-in task, or the user's files (with their field names)."""

    task: str | None = None  # "sst2", "agnews", "gsm8k"
    train_file: str | None = None
    test_file: str | None = None
    kind: str = "classification"  # for user files: "classification" or "causal-lm"
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_train: int | None = None
    max_test: int | None = None
    max_length: int = 128
    labels: list[str] = field(default_factory=list)


def load_data(spec: DataSpec) -> Task:
    if spec.task:
        return load_task(spec.task, spec.max_train, spec.max_test)
    if not spec.train_file:
        raise ValueError("give a built-in task (--task) or a training file (--train-file)")
    if spec.kind == "classification":
        train, labels = classification_rows(spec.train_file, spec.text_field, spec.label_field, spec.labels or None)
        test = classification_rows(spec.test_file, spec.text_field, spec.label_field, labels)[0] if spec.test_file \
            else []
    else:
        labels = []
        train = instruction_rows(spec.train_file, spec.prompt_field, spec.response_field)
        test = instruction_rows(spec.test_file, spec.prompt_field, spec.response_field) if spec.test_file else []
    name = Path(spec.train_file).stem
    return Task(name, spec.kind, train[: spec.max_train], test[: spec.max_test], labels, f"user data {name}")


def load_model_for(base: str, task: Task, device: str | torch.device = "auto",
                   dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Any]:
    from loralab.zoo.models import load_base

    if task.kind == "classification":
        return load_base(base, task="classification", num_labels=len(task.labels), device=device, dtype=dtype)
    return load_base(base, task="causal-lm", device=device, dtype=dtype)


def with_head(spec: AdapterSpec, model: nn.Module, task: Task) -> AdapterSpec:
    """Classification trains the freshly initialised head in full (PEFT's modules_to_save)."""
    if task.kind != "classification" or spec.modules_to_save:
        return spec
    heads = [h for h in HEADS if hasattr(model, h)]
    return AdapterSpec(**{**spec.to_dict(), "modules_to_save": heads})


def score(model: nn.Module, tokenizer, task: Task, examples: list[dict[str, Any]], batch_size: int = 64,
          precision: str = "fp32") -> dict[str, float]:
    return evaluate(model, examples, task.kind, batch_size, partial(collate, pad_token_id=tokenizer.pad_token_id),
                    progress=True, precision=precision)


def _loss(model: nn.Module, batch: dict, kind: str):
    return compute_loss(model, batch, kind)[0]


def finetune(base: str, spec: AdapterSpec, data: DataSpec, config: TrainConfig, out_dir: str | os.PathLike,
             resume: bool = False, evaluate_before: bool = True, calibration_batches: int = 8,
             device: str | torch.device = "auto", dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """Train an adapter on `device` ("auto": the GPU when there is one) and save it in out_dir/adapter;
    returns metrics before and after. `dtype`: the base weights' (e.g. "bfloat16", half the memory);
    over 16-bit weights the adapter is kept in float32 and trains under autocast (config.precision)."""
    torch.manual_seed(config.seed)  # the fresh classifier head, dropout, random inits
    task = load_data(data)
    model, tokenizer = load_model_for(base, task, device, dtype)
    sixteen_bit = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    spec = with_head(spec, model, task)
    train = make_examples(task.kind, task.train, tokenizer, data.max_length)
    test = make_examples(task.kind, task.test, tokenizer, data.max_length) if task.test else None
    config.task_kind = task.kind
    config.out_dir = str(out_dir)
    result: dict[str, Any] = {"task": task.name, "metric": task.metric}
    calibration, loss_fn = None, None
    if INITS.get(spec.init).needs_data:
        pad = partial(collate, pad_token_id=tokenizer.pad_token_id)
        size = config.batch_size
        calibration = [pad(train[i:i + size]) for i in range(0, min(len(train), size * calibration_batches), size)]
        loss_fn = partial(_loss, kind=task.kind)
    # first, so a bad spec fails before any work; at init the output is the base's
    add_adapter(model, spec, calibration=calibration, calibration_batches=calibration_batches, loss_fn=loss_fn,
                dtype=torch.float32 if sixteen_bit else None)
    check_adapter_dtypes(model, config.precision)  # before the first evaluation runs into the mix
    result["params"] = trainable_parameters(model)
    if test and evaluate_before:
        result["before"] = score(model, tokenizer, task, test, config.eval_batch_size, config.precision)
    adapter_dir = Path(out_dir) / "adapter"

    def also_save_adapter(trainer: Trainer, path: Path) -> None:
        save_adapter(model, path / "adapter")

    trainer = Trainer(model, train, test, config, on_save=also_save_adapter, pad_token_id=tokenizer.pad_token_id)
    result["after"] = trainer.train(resume_from="latest" if resume else None)
    save_adapter(model, adapter_dir)
    tokenizer.save_pretrained(Path(out_dir) / "tokenizer")
    result["adapter"] = str(adapter_dir)
    result["history"] = trainer.history
    return result
