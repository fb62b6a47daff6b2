"""Greedy decoding with one unmerged adapter: loralab vs HF PEFT vs the base model alone.

SmolLM2-135M's shape (random weights, as in bench/train_step.py), LoRA or DoRA r=16 on all
seven projections of every layer, `model.generate` of `--tokens` new tokens from a 16-token
prompt at batch 1 (EOS ignored). Each decoding step is a forward of one token, where reading
the weights is most of the work: DoRA's row norms ‖W + sBA‖ read every base weight once more
unless they are kept between forwards (loralab keeps them where no gradients are recorded;
PEFT only inside its opt-in `DoraCaching`, timed as a contender of its own).
Run: `.venv/bin/python bench/generate.py` (about five minutes). `--methods lora,dora,vb-lora,vera`
adds other methods (r=16, the same layers): PEFT's contender then reads the very adapter loralab saved,
where the method is saved in a PEFT format ("—" where it is loralab's own).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from common import describe, interleaved, markdown_table, synchronizer
from peft import PeftModel
from peft.helpers import DoraCaching
from train_step import TARGETS, make_models, smollm2_shape

import loralab as ll
from loralab.devices import resolve_device


def generate_fn(model: torch.nn.Module, ids: torch.Tensor, tokens: int, caching: bool = False):
    model.eval()
    model.generation_config.eos_token_id = None  # always `tokens` new tokens
    model.generation_config.pad_token_id = 0

    def generate() -> None:
        with torch.inference_mode(), DoraCaching(enabled=caching):
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    return generate


def models_for(base: torch.nn.Module, method: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(loralab's model, PEFT's) for one method: LoRA and DoRA built by each library, any other method by
    loralab and read by PEFT from loralab's file (None where that file is loralab's own format)."""
    if method in ("lora", "dora"):
        return make_models(base, dora=method == "dora")
    ours = copy.deepcopy(base)
    ll.add_adapter(ours, ll.AdapterSpec(method=method, r=16, alpha=32, targets=TARGETS))
    with tempfile.TemporaryDirectory() as folder:
        ll.save_adapter(ours, folder)
        if ll.read_config(folder)["peft_type"] == "LORALAB":
            return ours, None
        return ours, PeftModel.from_pretrained(copy.deepcopy(base), folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, … (auto: the GPU when there is one)")
    ap.add_argument("--methods", default="lora,dora", help="comma-separated adapter methods")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = smollm2_shape(args.layers).to(device)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    sync, rows = synchronizer(device), []
    for method in args.methods.split(","):
        ours, theirs = models_for(base, method)
        contenders = {"base": generate_fn(base, ids, args.tokens), "loralab": generate_fn(ours, ids, args.tokens)}
        if theirs is not None:
            contenders["peft"] = generate_fn(theirs, ids, args.tokens)
        if method == "dora":
            contenders["peft, DoraCaching"] = generate_fn(theirs, ids, args.tokens, caching=True)
        times = interleaved(contenders, "base", rounds=args.rounds, repeats=1, warmup=1, sync=sync)
        ratio = {k: f"{v['ratio']:.3f}x" for k, v in times.items()}
        rows.append([method, ratio["loralab"], ratio.get("peft", "—"), ratio.get("peft, DoraCaching", "—"),
                     f"{times['base']['seconds'] * 1000 / args.tokens:.1f} ms"])
    print(f"SmolLM2-135M shape ({args.layers} layers), greedy decoding of {args.tokens} tokens at batch 1, r=16 "
          f"on 7 projections, unmerged, {describe(device, args.threads)}, median of {args.rounds} interleaved rounds")
    print(markdown_table(["adapter", "loralab / base", "PEFT / base", "PEFT with DoraCaching / base",
                          "base, per token"], rows))


if __name__ == "__main__":
    main()
