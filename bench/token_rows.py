"""What trainable token rows (PEFT's TrainableTokens) add to a LoRA training step: loralab vs HF PEFT.

SmolLM2-135M's shape (random weights, tied embeddings, a 49152-token vocabulary), LoRA r=16 on q_proj
and v_proj; "+ tokens" also trains the rows of 16 tokens of the input embedding, which the tied output
head shares. Each library's step with token rows is timed against its own step without them, round by
round in one process, so the ratio is what the rows cost. PEFT builds the full weight with the rows
written in (`W.index_copy`) in every forward of the embedding and of the head; loralab overwrites only
what the rows produce. Run: `.venv/bin/python bench/token_rows.py`.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import add_run_args, interleaved, markdown_table
from peft import LoraConfig, get_peft_model
from train_step import smollm2_shape

import loralab as ll

TARGETS = ["q_proj", "v_proj"]
TOKENS = list(range(49136, 49152))  # the last 16 ids, where new chat tokens go


def step(model: torch.nn.Module, ids: torch.Tensor):
    trained = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        for p in trained:
            p.grad = None

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks (the rows' cost does not grow with them)")
    add_run_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = smollm2_shape(args.layers)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids[:, ::8] = torch.tensor(TOKENS[:1])  # the trained tokens occur in the batch
    models = {}
    for tokens in (None, TOKENS):
        spec = ll.AdapterSpec(r=16, alpha=32, targets=TARGETS, trainable_token_indices=tokens)
        models[f"loralab{' + tokens' if tokens else ''}"] = ll.add_adapter(copy.deepcopy(base), spec)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, trainable_token_indices=tokens)
        models[f"peft{' + tokens' if tokens else ''}"] = get_peft_model(copy.deepcopy(base), config)
    rows = []
    for lib in ("loralab", "peft"):
        named = {lib: step(models[lib], ids), f"{lib} + tokens": step(models[f"{lib} + tokens"], ids)}
        times = interleaved(named, lib, rounds=args.rounds, repeats=1, warmup=2)
        rows.append([lib, f"{times[f'{lib} + tokens']['ratio']:.3f}x", f"{times[lib]['seconds'] * 1000:.1f} ms"])
    print(f"SmolLM2-135M shape ({args.layers} layers, tied embeddings), batch {args.batch}x{args.seq}, LoRA r=16 on "
          f"{', '.join(TARGETS)}, {len(TOKENS)} trainable token rows, CPU, {args.threads} thread(s), median of "
          f"{args.rounds} interleaved rounds")
    print(markdown_table(["library", "train step with token rows / without", "step without"], rows))


if __name__ == "__main__":
    main()
