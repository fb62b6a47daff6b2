"""`loralab demo` / `make demo`: the main job, end to end on the embedded defaults.

Fine-tunes the embedded MiniLM encoder with LoRA on the built-in SST-2 sentiment data,
prints test accuracy before (a fresh head: chance) and after, saves the adapter in HF PEFT
format, reloads it into a fresh base model (and into PEFT itself, when installed) and
checks the reloaded accuracy is the same.
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from pathlib import Path

import torch

from loralab.checkpoint import load_adapter
from loralab.devices import resolve_device
from loralab.spec import AdapterSpec
from loralab.train.data import collate, make_examples
from loralab.train.recipes import DataSpec, finetune, load_model_for
from loralab.train.trainer import TrainConfig, evaluate
from loralab.zoo.datasets import load_task

BASE = "minilm-l6"


def reload_accuracy(adapter: Path, use_peft: bool, device: torch.device) -> float | None:
    task = load_task("sst2")
    model, tok = load_model_for(BASE, task, device)
    if use_peft:
        try:
            from peft import PeftModel
        except ImportError:
            return None
        with warnings.catch_warnings():  # PEFT's own use of a name transformers deprecates, not ours to mend
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
    else:
        load_adapter(model, adapter)
    test = make_examples(task.kind, task.test, tok, 128)
    return evaluate(model, test, task.kind, 128, partial(collate, pad_token_id=tok.pad_token_id))["accuracy"]


def run(out_dir: str = "runs/demo", steps: int = 450, batch_size: int = 32, lr: float = 1e-3, r: int = 8,
        device: str = "auto") -> dict:
    start = time.perf_counter()
    where = resolve_device(device)
    out = Path(out_dir)
    spec = AdapterSpec(method="lora", r=r, alpha=2 * r, targets="all-linear")
    print(f"loralab demo: LoRA r={r} on every linear layer of the embedded {BASE} encoder, built-in SST-2 "
          f"(8,000 train / 872 test sentences), {steps} steps of {batch_size} on {where}")
    config = TrainConfig(lr=lr, batch_size=batch_size, max_steps=steps, warmup_steps=max(1, steps // 15),
                         eval_batch_size=128, log_every=25)
    result = finetune(BASE, spec, DataSpec(task="sst2"), config, out, device=where)
    adapter = Path(result["adapter"])
    before, after = result["before"]["accuracy"], result["after"]["accuracy"]
    reloaded = reload_accuracy(adapter, use_peft=False, device=where)
    in_peft = reload_accuracy(adapter, use_peft=True, device=where)
    minutes = (time.perf_counter() - start) / 60
    print()
    print(f"  {result['params']}")
    print(f"  SST-2 test accuracy before fine-tuning : {before:.4f}  (fresh classifier head: chance)")
    print(f"  SST-2 test accuracy after  fine-tuning : {after:.4f}")
    print(f"  reloaded from {adapter} : {reloaded:.4f}")
    print("  loaded by HF PEFT (PeftModel)          : " + (f"{in_peft:.4f}" if in_peft is not None else
                                                          "peft not installed"))
    print(f"  wall time: {minutes:.1f} min; training log: {out / 'log.jsonl'}")
    if after < before + 0.2:
        raise SystemExit("demo failed: accuracy did not improve clearly")
    if abs(reloaded - after) > 1e-9 or (in_peft is not None and abs(in_peft - after) > 1e-9):
        raise SystemExit("demo failed: the reloaded adapter does not reproduce the accuracy")
    return {"before": before, "after": after, "reloaded": reloaded, "peft": in_peft, "minutes": minutes}
