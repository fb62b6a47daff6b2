"""LoRA on a mixture-of-experts block's expert weights (PEFT's target_parameters): loralab vs HF PEFT.

A Mixtral-shaped model (random weights: only the shape matters for time), LoRA r=16 on every layer's
stacked expert weights (`experts.gate_up_proj`, `experts.down_proj`, one update per expert). Both
libraries form W + ΔW for the block's forward in one batched product per parameter (PEFT through a
cached parametrization, loralab through torch.func.functional_call) and let the experts kernel run
on it, so the update costs a pass over every expert's weight per step, whatever the batch. Floor: the
frozen base's forward + backward (activation gradients only), or its forward for inference.
Run: `.venv/bin/python bench/moe_parameters.py`.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import add_run_args, interleaved, markdown_table, randomise_lora_b
from peft import LoraConfig, get_peft_model
from train_step import forward_fn, step_fn
from transformers import MixtralConfig, MixtralForCausalLM

import loralab as ll

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def mixtral_shape(args: argparse.Namespace) -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                        num_local_experts=args.experts, num_experts_per_tok=2, tie_word_embeddings=True)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    return model.requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    add_run_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = mixtral_shape(args)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ours = ll.add_adapter(copy.deepcopy(base), ll.AdapterSpec(r=16, alpha=32, targets=[], target_parameters=EXPERTS))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=[],
                                                            target_parameters=EXPERTS))
    randomise_lora_b(ours, theirs)
    rows = []
    for what, anchor, fn, floor in (("train step", "floor", step_fn, step_fn(base, ids, floor=True)),
                                    ("unmerged inference", "base", forward_fn, forward_fn(base, ids))):
        named = {anchor: floor, "loralab": fn(ours, ids), "peft": fn(theirs, ids)}
        times = interleaved(named, anchor, rounds=args.rounds, repeats=1, warmup=2)
        o, q = times["loralab"]["ratio"], times["peft"]["ratio"]
        rows.append([what, f"{o:.3f}x", f"{q:.3f}x", f"{q / o:.2f}x", f"{times[anchor]['seconds'] * 1000:.1f} ms"])
    print(f"Mixtral shape ({args.layers} layers, width {args.hidden}, {args.experts} experts of width "
          f"{args.intermediate}, top-2), batch {args.batch}x{args.seq}, LoRA r=16 on {', '.join(EXPERTS)}, CPU, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds")
    print(markdown_table(["contender", "loralab / floor", "PEFT / floor", "loralab speed-up over PEFT", "floor"],
                         rows))


if __name__ == "__main__":
    main()
