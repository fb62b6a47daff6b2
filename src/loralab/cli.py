"""The `loralab` command: thin wrappers that parse arguments, call the library and print."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable


def _parse_options(pairs: list[str]) -> dict:
    """--option key=value (value parsed as JSON when it can be: numbers, true/false, lists)."""
    from loralab.spec import option_value

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option wants key=value, got {pair!r}")
        out[key] = option_value(value)
    return out


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--method", default="lora", help="ΔW form (see `loralab methods`)")
    g.add_argument("--r", type=int, default=8, help="rank")
    g.add_argument("--alpha", type=float, default=16.0, help="scaling numerator: scale = alpha / r")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter path")
    g.add_argument("--targets", default="all-linear",
                   help="comma-separated module-name suffixes (q_proj,v_proj), a regex, all-linear, or none (only "
                        "the token rows or parameters below)")
    g.add_argument("--layers", type=_int_ranges, metavar="0,2,20-29",
                   help="only targets in these numbered blocks (PEFT's layers_to_transform)")
    g.add_argument("--layers-pattern", help="the name before the block index, e.g. layers or h (default: the first "
                                            "number in the module name)")
    g.add_argument("--init", default="gaussian", help="initialiser (see `loralab methods`)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA)")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option; repeatable")
    g.add_argument("--rank-pattern", action="append", metavar="MODULE=R",
                   help="matching modules get their own rank (PEFT's rank_pattern), e.g. down_proj=32; repeatable")
    g.add_argument("--alpha-pattern", action="append", metavar="MODULE=ALPHA",
                   help="matching modules get their own alpha (PEFT's alpha_pattern); repeatable")
    g.add_argument("--init-option", action="append", metavar="KEY=VALUE",
                   help="an initialiser option, e.g. rho=2 for eva; repeatable")
    g.add_argument("--trainable-tokens", metavar="<|im_start|>,2,49150-49151",
                   help="tokens whose rows of the input embedding train too (PEFT's trainable_token_indices), "
                        "by their text in the tokenizer or by id; a tied output head uses the same rows")
    g.add_argument("--target-parameters", metavar="experts.gate_up_proj,experts.down_proj",
                   help="parameters LoRA updates directly, by their names' endings (PEFT's target_parameters): 2-D "
                        "weights, or a mixture-of-experts block's 3-D expert stacks (one update per expert)")
    g.add_argument("--alora-invocation", metavar="TEXT",
                   help="activated LoRA: the adapter acts only from the last occurrence of TEXT's tokens (in the "
                        "base's tokenizer) on, the tokens before run as the base model (PEFT's "
                        "alora_invocation_tokens), e.g. '<|im_start|>assistant'")
    g.add_argument("--layer-replication", type=_block_ranges, metavar="0:4,2:5",
                   help="rebuild the model's blocks from ranges START:END (END excluded) of them, copies sharing "
                        "their weights, each with its own adapters (PEFT's layer_replication): 0:4,2:5 gives blocks "
                        "0 1 2 3 2 3 4")
    g.add_argument("--calibration-batches", type=int, default=8,
                   help="training batches that data-driven inits (lora-ga, eva, corda) look at")


def _int_ranges(text: str) -> list[int]:
    """"0,2,20-29" → [0, 2, 20, …, 29] (block indices, token ids)."""
    indices: list[int] = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or (last and int(last) < int(first)):
            raise argparse.ArgumentTypeError(f"{part!r} is not a number or a range like 20-29")
        indices.extend(range(int(first), int(last or first) + 1))
    if not indices:
        raise argparse.ArgumentTypeError("give numbers or ranges, e.g. 0,2,20-29")
    return indices


def _block_ranges(text: str) -> list[list[int]]:
    """"0:4,2:5" → [[0, 4], [2, 5]] (block ranges [start, end))."""
    ranges = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        match = re.fullmatch(r"(\d+):(\d+)", part)
        if match is None or int(match[1]) >= int(match[2]):
            raise argparse.ArgumentTypeError(f"{part!r} is not a block range START:END with START < END, e.g. 2:5")
        ranges.append([int(match[1]), int(match[2])])
    if not ranges:
        raise argparse.ArgumentTypeError("give block ranges START:END, e.g. 0:4,2:5")
    return ranges


def _token_ids(text: str | None, base: str) -> list[int] | None:
    """"<|im_start|>,2,49150-49151" → token ids: numbers and ranges as they are, other parts looked up in the
    tokenizer of `base`."""
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    named = [p for p in parts if not re.fullmatch(r"\d+(-\d+)?", p)]
    vocab = {}
    if named:
        from transformers import AutoTokenizer

        from loralab.registry import close_matches
        from loralab.zoo.models import resolve

        vocab = AutoTokenizer.from_pretrained(resolve(base), local_files_only=True).get_vocab()
    ids: list[int] = []
    for part in parts:
        if part not in named:
            try:
                ids.extend(_int_ranges(part))
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"--trainable-tokens: {err}") from None
        elif part in vocab:
            ids.append(vocab[part])
        else:
            close = close_matches(part, vocab)
            raise ValueError(f"--trainable-tokens: {part!r} is not a token of {base}'s tokenizer"
                             + (f"; close: {', '.join(close)}" if close else ""))
    if not ids:
        raise ValueError("--trainable-tokens: give token ids, ranges like 20-29, or tokens by their text")
    return ids


def _invocation_ids(text: str, base: str) -> list[int]:
    """TEXT's token ids in the tokenizer of `base`, without special tokens added around them."""
    from transformers import AutoTokenizer

    from loralab.zoo.models import resolve

    ids = AutoTokenizer.from_pretrained(resolve(base), local_files_only=True)(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"--alora-invocation: {text!r} has no tokens in {base}'s tokenizer")
    return ids


def spec_from_args(args: argparse.Namespace, modules_to_save: list[str] | None = None):
    from loralab.spec import AdapterSpec

    targets = args.targets
    if targets in ("", "none"):
        targets = []
    elif targets != "all-linear" and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    elif targets != "all-linear" and targets.isidentifier():
        targets = [targets]
    options = _parse_options(args.option)
    if args.alora_invocation:
        options["alora_invocation_tokens"] = _invocation_ids(args.alora_invocation, args.base)
    return AdapterSpec(method=args.method, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets,
                       init=args.init, rslora=args.rslora, modules_to_save=modules_to_save or [],
                       layers=args.layers, layers_pattern=args.layers_pattern,
                       options=options, init_options=_parse_options(args.init_option),
                       rank_pattern=_parse_options(args.rank_pattern), alpha_pattern=_parse_options(args.alpha_pattern),
                       trainable_token_indices=_token_ids(args.trainable_tokens, args.base),
                       target_parameters=[t.strip() for t in args.target_parameters.split(",") if t.strip()]
                       if args.target_parameters else None, layer_replication=args.layer_replication)


def add_data_args(p: argparse.ArgumentParser, train: bool) -> None:
    g = p.add_argument_group("data (a built-in task, or your own files)")
    g.add_argument("--task", help="built-in task: sst2, agnews (classification) or gsm8k (chat)")
    if train:
        g.add_argument("--train-file", help=".jsonl/.json/.csv/.tsv training data")
    g.add_argument("--test-file", help="evaluation data in the same format")
    g.add_argument("--kind", choices=["classification", "causal-lm"], default="classification",
                   help="what your files hold")
    g.add_argument("--text-field", default="text", help="column with the text (classification)")
    g.add_argument("--label-field", default="label", help="column with the class label (classification)")
    g.add_argument("--prompt-field", default="prompt", help="column with the prompt (causal-lm)")
    g.add_argument("--response-field", default="response",
                   help="column with the response, the only tokens the loss counts (causal-lm)")
    if train:
        g.add_argument("--max-train", type=int, help="use at most this many training rows")
    g.add_argument("--max-test", type=int, help="use at most this many evaluation rows")
    g.add_argument("--max-length", type=int, default=128, help="tokens per example")


def data_from_args(args: argparse.Namespace):
    from loralab.train.recipes import DataSpec

    return DataSpec(task=args.task, train_file=getattr(args, "train_file", None), test_file=args.test_file,
                    kind=args.kind, text_field=args.text_field, label_field=args.label_field,
                    prompt_field=args.prompt_field, response_field=args.response_field,
                    max_train=getattr(args, "max_train", None), max_test=args.max_test, max_length=args.max_length)


def add_device_args(p: argparse.ArgumentParser, precision: bool = False, dtype: bool = False,
                    memory: bool = False) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto (a GPU when torch sees one, else the CPU), cpu, cuda, "
                                                    "cuda:N or mps")
    if memory:
        g.add_argument("--release-memory", action="store_true",
                       help="leave malloc as it is, handing freed memory back to the OS. Otherwise, on the CPU, the "
                            "command keeps it for its next steps, which spares faulting large tensors' pages in again "
                            "every step, and holds its peak memory until it exits (loralab.host_memory)")
    if precision:
        g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="mixed precision: float32 weights, bf16/fp16 matrix products (fp16 with loss scaling)")
    if dtype:
        g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="the base weights' dtype; None keeps the one stored")


def _print_metrics(label: str, metrics: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{label}: {shown}")


# ---- train ---------------------------------------------------------------------------------
def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="minilm-l6", help="embedded model (minilm-l6, smollm2-135m) or local HF folder")
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl and the final adapter/")
    add_data_args(p, train=True)
    add_adapter_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=300, help="optimiser steps")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="forward passes per optimiser step (effective batch = batch-size × this)")
    g.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="learning-rate decay after the warm-up")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    g.add_argument("--optimizer", default="adamw", help="adamw, lora+, lora-fa, lora-pro, altlora, riemannian")
    g.add_argument("--optimizer-option", action="append", metavar="KEY=VALUE", help="e.g. ratio=16 for lora+")
    g.add_argument("--rank-schedule", help="adalora, increlora, dylora, sora or lora-squeeze (trainer callback)")
    g.add_argument("--rank-option", action="append", metavar="KEY=VALUE", help="e.g. target_rank=4 for adalora")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--seed", type=int, default=0, help="seed for the adapter's initialisation, data order and dropout")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step: a one-off compile (about 50 s for SmolLM2-135M on 2 "
                        "CPU cores); whether the steps then run faster depends on the machine (see the README)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each transformer block's input for the backward and recompute the rest there: "
                        "far less activation memory for one more forward of every block (transformers models)")
    add_device_args(p, memory=True, precision=True, dtype=True)


def train(args: argparse.Namespace) -> int:
    from loralab.train.recipes import finetune
    from loralab.train.trainer import TrainConfig

    config = TrainConfig(lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.steps,
                         warmup_steps=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
                         optimizer=args.optimizer, optimizer_options=_parse_options(args.optimizer_option),
                         rank_schedule=args.rank_schedule, rank_options=_parse_options(args.rank_option),
                         max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                         save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
                         precision=args.precision, compile=args.compile,
                         gradient_checkpointing=args.gradient_checkpointing)
    result = finetune(args.base, spec_from_args(args), data_from_args(args), config, args.out, resume=args.resume,
                      calibration_batches=args.calibration_batches, device=args.device, dtype=args.dtype)
    print(result["params"])
    if "before" in result:
        _print_metrics("before", result["before"])
    _print_metrics("after", result["after"])
    print(f"adapter saved in {result['adapter']}")
    return 0


# ---- eval ----------------------------------------------------------------------------------
def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="minilm-l6", help="embedded model or local HF folder")
    p.add_argument("--adapter", help="adapter folder (omit to score the base model alone)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    add_data_args(p, train=False)
    add_device_args(p, memory=True, precision=True)


def evaluate_cmd(args: argparse.Namespace) -> int:
    from functools import partial

    from loralab.checkpoint import load_adapter
    from loralab.train.data import collate, make_examples
    from loralab.train.recipes import load_data, load_model_for
    from loralab.train.trainer import evaluate

    data = data_from_args(args)
    if not data.task and not data.test_file:
        raise ValueError("give a built-in task (--task) or evaluation data (--test-file)")
    if not data.task:
        data.train_file = data.test_file
    task = load_data(data)
    rows = task.test or task.train
    model, tok = load_model_for(args.base, task, args.device)
    if args.adapter:
        load_adapter(model, args.adapter)
    examples = make_examples(task.kind, rows, tok, data.max_length)
    metrics = evaluate(model, examples, task.kind, args.batch_size, partial(collate, pad_token_id=tok.pad_token_id),
                       progress=True, precision=args.precision)
    _print_metrics(f"{task.name} ({len(rows)} examples)", metrics)
    return 0


# ---- demo ----------------------------------------------------------------------------------
def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--steps", type=int, default=450, help="optimiser steps")
    add_device_args(p, memory=True)


def demo(args: argparse.Namespace) -> int:
    from loralab.demo import run

    run(args.out, steps=args.steps, device=args.device)
    return 0


# ---- methods -------------------------------------------------------------------------------
def methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def methods(args: argparse.Namespace) -> int:
    from loralab.inits.base import INITS
    from loralab.methods.base import METHODS
    from loralab.train.optim import OPTIMIZERS
    from loralab.train.rank import RANK_SCHEDULES

    rows = [{"name": n, "summary": c.summary, "paper": c.paper and f"arXiv:{c.paper}",
             "trainable params per layer": c.param_formula, "peft_type": c.peft_type, "peft_when": c.peft_when}
            for n, c in METHODS.items()]
    inits = [{"name": n, "summary": i.summary, "paper": i.paper and f"arXiv:{i.paper}",
              "needs calibration data": i.needs_data} for n, i in INITS.items()]
    extras = {"optimizers (TrainConfig(optimizer=...), --optimizer)": _documented(OPTIMIZERS.items()),
              "rank schedules (TrainConfig(rank_schedule=...), --rank-schedule)": _documented(RANK_SCHEDULES.items())}
    if args.json:
        print(json.dumps({"methods": rows, "inits": inits, **extras}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows + inits)
    print("Methods (AdapterSpec(method=...), --method):")
    for r in rows:
        when = f" with {r['peft_when']}" if r["peft_when"] else ""
        peft = f"; PEFT reads it as {r['peft_type']}{when}" if r["peft_type"] else ""
        params = r["trainable params per layer"]
        print(f"  {r['name']:<{width}}  {r['summary']}  [{r['paper']}; params: {params}{peft}]")
    print("(The others are saved with \"peft_type\": \"LORALAB\", which loralab reads and PEFT does not.)")
    print("\nInitialisers (AdapterSpec(init=...), --init):")
    for r in inits:
        paper = f"  [{r['paper']}]" if r["paper"] else ""
        data = "  (needs calibration data)" if r["needs calibration data"] else ""
        print(f"  {r['name']:<{width}}  {r['summary']}{paper}{data}")
    for title, entries in extras.items():
        print(f"\n{title[0].upper()}{title[1:]}:")
        for name, summary in entries.items():
            print(f"  {name:<{width}}  {summary}")
    return 0


def _documented(items) -> dict[str, str]:
    """name → the first sentence of the docstring of the module that defines it."""
    out = {}
    for name, obj in items:
        doc = (sys.modules[obj.__module__].__doc__ or "").strip().replace("\n", " ")
        out[name] = doc.split(": ", 1)[-1].split(". ")[0] if doc else ""
    return out


# ---- inspect -------------------------------------------------------------------------------
def inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--json", action="store_true", help="print JSON")


def inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from loralab.inspect_adapter import summarize

    s = summarize(args.adapter)
    if args.json:
        print(json.dumps(asdict(s), indent=2))
        return 0
    c = s.config
    method = "token rows only" if s.tokens_only else s.method
    print(f"adapter   {s.path}\nmethod    {method} (peft_type {c.get('peft_type')})")
    if not s.tokens_only:
        print(f"rank      r={s.r} alpha={s.alpha:g} rslora={s.rslora}")
    print(f"targets   {c.get('target_modules')}\nbase      {c.get('base_model_name_or_path')}\n"
          f"task      {c.get('task_type')}\nparams    {s.params:,} in {len(s.layers)} modules")
    if s.tokens:
        print(f"tokens    trained rows of {s.tokens}")
    if c.get("target_parameters"):
        print(f"parameters {c['target_parameters']} (LoRA on the parameters themselves)")
    if c.get("layer_replication"):
        print(f"blocks    replicated from ranges {c['layer_replication']} (copies sharing their weights)")
    width = max((len(layer.module) for layer in s.layers), default=6)
    print(f"\n  {'module':<{width}}  {'params':>9}  {'|s·BA|_F':>10}  {'|tensors|':>10}")
    for layer in s.layers:
        delta = f"{layer.delta_norm:10.4f}" if layer.delta_norm is not None else f"{'-':>10}"
        print(f"  {layer.module:<{width}}  {layer.params:>9,}  {delta}  {layer.tensor_norm:10.4f}")
    for note in s.notes:
        print(f"\nnote: {note}")
    return 0


# ---- generate ------------------------------------------------------------------------------
def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--adapter", help="adapter folder to apply (omit for the base model alone)")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample among the likeliest tokens holding this much mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat template")
    p.add_argument("--unmerged", action="store_true",
                   help="keep the adapter out of the weights (default: folded into float32 weights first, which "
                        "gives the same tokens at the base model's speed)")
    add_device_args(p, dtype=True)


def generate(args: argparse.Namespace) -> int:
    import torch

    from loralab.loading import load_with_adapter

    model, tok = load_with_adapter(args.base, args.adapter, task="causal-lm", device=args.device, dtype=args.dtype,
                                   merged=not args.unmerged)
    if not args.no_chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = args.prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=args.no_chat).to(model.device)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample, pad_token_id=tok.pad_token_id,
                             **({"temperature": args.temperature, "top_p": args.top_p} if sample else {}))
    print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


# ---- merge ---------------------------------------------------------------------------------
def merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="embedded model name or local HF folder the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model (transformers loads it)")


def merge(args: argparse.Namespace) -> int:
    from loralab.export import export_merged

    out = export_merged(args.base, args.adapter, args.out)
    print(f"merged model written to {out} (load it with transformers' from_pretrained)")
    return 0


# ---- squeeze -------------------------------------------------------------------------------
def squeeze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="LoRA or DoRA adapter folder")
    p.add_argument("--rank", type=int, required=True, help="the new, smaller rank")
    p.add_argument("--out", required=True, help="folder for the squeezed adapter")


def squeeze(args: argparse.Namespace) -> int:
    from loralab.train.rank.lora_squeeze import squeeze_adapter

    out = squeeze_adapter(args.adapter, args.rank, args.out)
    print(f"rank-{args.rank} adapter (best rank-{args.rank} approximation of each ΔW) written to {out}")
    return 0


# ---- compare -------------------------------------------------------------------------------
def compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="minilm-l6", help="embedded model or local HF folder")
    p.add_argument("--task", default="sst2", help="built-in classification task")
    p.add_argument("--methods", required=True,
                   help="comma-separated method names; a variant with options as name:key=value[:key=value], "
                        "e.g. bone:share=rows")
    p.add_argument("--budget", type=int, default=100, help="training steps per run")
    p.add_argument("--lr-grid", type=int, default=3, choices=[1, 3, 5], help="learning rates per method")
    p.add_argument("--extend", type=int, default=2,
                   help="extra rates tried past the grid's edge while the best rate is the lowest or highest tried")
    p.add_argument("--r", type=int, default=8, help="rank of every method's adapter")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--max-train", type=int, default=3000, help="training rows used")
    p.add_argument("--max-test", type=int, help="test rows used (default: all)")
    p.add_argument("--out", required=True, help="folder for results.csv, results.md, results.png")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out (same settings) and run only the missing methods")
    add_device_args(p, memory=True, precision=True)


def compare_cmd(args: argparse.Namespace) -> int:
    from loralab.train.compare import compare, markdown

    rows = compare(args.base, args.task, [m.strip() for m in args.methods.split(",") if m.strip()], args.out,
                   budget=args.budget, lr_grid=args.lr_grid, r=args.r, batch_size=args.batch_size,
                   max_train=args.max_train, max_test=args.max_test, resume=args.resume, extend=args.extend,
                   device=args.device, precision=args.precision)
    print(markdown(rows, f"{args.task} accuracy"))
    return 0


# ---- combine -------------------------------------------------------------------------------
def combine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", help="LoRA adapter folders trained on the same base")
    p.add_argument("--method", default="linear",
                   help="linear, cat, svd, ties, dare, dare-ties, magnitude-prune or lora-lego")
    p.add_argument("--weights", help="comma-separated, one per adapter (default: all 1)")
    p.add_argument("--rank", type=int, help="rank of the result (svd, ties, dare, … ; default: see docs)")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction for ties/dare/magnitude-prune")
    p.add_argument("--seed", type=int, default=0, help="for dare's random drops and lora-lego's clustering")
    p.add_argument("--allow-partial", action="store_true", help="treat a layer an adapter lacks as a zero update")
    p.add_argument("--out", required=True, help="folder for the combined adapter")


def combine_cmd(args: argparse.Namespace) -> int:
    from loralab.compose import combine_folders

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    out = combine_folders(args.adapters, args.out, method=args.method, weights=weights, rank=args.rank,
                          density=args.density, seed=args.seed, allow_partial=args.allow_partial)
    print(f"combined adapter ({args.method}) written to {out}")
    return 0


# ---- analyze -------------------------------------------------------------------------------
def analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="LoRA-family adapter folder")
    p.add_argument("--base", help="base model: adds intruder dimensions against its weights")
    p.add_argument("--other", help="a second adapter: adds subspace similarity per layer")
    p.add_argument("--out", required=True, help="folder for the PNGs and report.html")


def analyze_cmd(args: argparse.Namespace) -> int:
    from loralab.analysis import analyze

    print(f"report written to {analyze(args.adapter, args.out, base=args.base, other=args.other)}")
    return 0



# ---- serve ---------------------------------------------------------------------------------
def serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="smollm2-135m", help="embedded causal LM name or local HF model folder")
    p.add_argument("--adapters", help="folder of PEFT-format LoRA adapters, each registered under its relative path; "
                                      "POST /v1/adapters adds folders under it while the server runs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-loaded", type=int, default=64, help="adapters resident at once (least recently used "
                                                               "evicted)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    add_device_args(p, dtype=True)


def serve_cmd(args: argparse.Namespace) -> int:
    from loralab.serve.server import serve

    serve(args.base, args.adapters, args.host, args.port, args.max_loaded, args.max_batch, args.max_queue,
          device=args.device, dtype=args.dtype)
    return 0

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "train": ("fine-tune an adapter on a built-in task or your own data and save it", train_args, train),
    "eval": ("score a base model, with or without an adapter, on a task", eval_args, evaluate_cmd),
    "demo": ("the main job: LoRA on the embedded MiniLM with SST-2, before/after, save and reload", demo_args, demo),
    "compare": ("train several methods on the same task with a small lr sweep each and tabulate them",
                compare_args, compare_cmd),
    "methods": ("list the adapter methods and initialisers with their papers", methods_args, methods),
    "inspect": ("show an adapter folder's config, parameter count and per-layer norms", inspect_args, inspect),
    "generate": ("generate text with a causal LM, with or without an adapter", generate_args, generate),
    "squeeze": ("compress a trained LoRA adapter to a smaller rank (LoRA-Squeeze, SVD of ΔW)", squeeze_args,
                squeeze),
    "combine": ("merge several LoRA adapters into one (linear, cat, svd, ties, dare, …)", combine_args,
                combine_cmd),
    "analyze": ("plots and an HTML report of an adapter: norms, ranks, spectra, intruders, similarity",
                analyze_args, analyze_cmd),
    "merge": ("fold an adapter into its base model and write a plain transformers model folder", merge_args, merge),
    "serve": ("serve the base model and many adapters, mixed in every batch, behind an OpenAI-compatible HTTP API",
              serve_args, serve_cmd),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for flags, required options, a default of
    None, or help that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _keep_host_memory(args: argparse.Namespace) -> None:
    """Commands that train or evaluate keep freed host memory for reuse on the CPU, unless told not to."""
    if getattr(args, "release_memory", True):
        return
    from loralab.devices import resolve_device
    from loralab.host_memory import reuse_freed_memory

    if resolve_device(args.device).type == "cpu":
        reuse_freed_memory()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loralab", description="Low-rank adapters for PyTorch models: train, save (HF PEFT format), "
        "evaluate, generate, merge and inspect.",
        epilog="Run `loralab <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        add_args(p)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        _keep_host_memory(args)
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"loralab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
