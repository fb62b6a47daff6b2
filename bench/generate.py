"""Greedy decoding with one unmerged adapter: loralab vs HF PEFT vs the base model alone.

SmolLM2-135M's shape (random weights, as in bench/train_step.py), LoRA or DoRA r=16 on all
seven projections of every layer, `model.generate` of `--tokens` new tokens from a 16-token
prompt at batch 1 (EOS ignored). Each decoding step is a forward of one token, where reading
the weights is most of the work: DoRA's row norms ‖W + sBA‖ read every base weight once more
unless they are kept between forwards (loralab keeps them where no gradients are recorded;
PEFT only inside its opt-in `DoraCaching`, timed as a contender of its own).
Run: `.venv/bin/python bench/generate.py` (about five minutes).
"""

from __future__ import annotations

import argparse

import torch
from common import describe, interleaved, markdown_table, synchronizer
from peft.helpers import DoraCaching
from train_step import make_models, smollm2_shape

from loralab.devices import resolve_device


def generate_fn(model: torch.nn.Module, ids: torch.Tensor, tokens: int, caching: bool = False):
    model.eval()
    model.generation_config.eos_token_id = None  # always `tokens` new tokens
    model.generation_config.pad_token_id = 0

    def generate() -> None:
        with torch.inference_mode(), DoraCaching(enabled=caching):
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    return generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, … (auto: the GPU when there is one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = smollm2_shape(args.layers).to(device)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    sync, rows = synchronizer(device), []
    for method in ("LoRA", "DoRA"):
        ours, theirs = make_models(base, dora=method == "DoRA")
        contenders = {"base": generate_fn(base, ids, args.tokens), "loralab": generate_fn(ours, ids, args.tokens),
                      "peft": generate_fn(theirs, ids, args.tokens)}
        if method == "DoRA":
            contenders["peft, DoraCaching"] = generate_fn(theirs, ids, args.tokens, caching=True)
        times = interleaved(contenders, "base", rounds=args.rounds, repeats=1, warmup=1, sync=sync)
        rows.append([method, f"{times['loralab']['ratio']:.3f}x", f"{times['peft']['ratio']:.3f}x",
                     f"{times['peft, DoraCaching']['ratio']:.3f}x" if method == "DoRA" else "—",
                     f"{times['base']['seconds'] * 1000 / args.tokens:.1f} ms"])
    print(f"SmolLM2-135M shape ({args.layers} layers), greedy decoding of {args.tokens} tokens at batch 1, r=16 "
          f"on 7 projections, unmerged, {describe(device, args.threads)}, median of {args.rounds} interleaved rounds")
    print(markdown_table(["adapter", "loralab / base", "PEFT / base", "PEFT with DoraCaching / base",
                          "base, per token"], rows))


if __name__ == "__main__":
    main()
