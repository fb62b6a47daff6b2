"""Training-step and unmerged-inference cost of loralab vs HF PEFT vs the frozen base model.

SmolLM2-135M's shape (random weights: only the shape matters for time), LoRA r=16 on all
seven projections of every layer (and DoRA the same way). Floor = the frozen base's forward +
backward (activation gradients only), or its forward for inference (PEFT's DoRA as it runs by
default, without its opt-in `DoraCaching`). Run: `.venv/bin/python bench/train_step.py`.
`--ranks 1 16 64` instead times the LoRA train step at each rank, which separates what a
LoRA layer costs whatever its rank (passes over the activations) from what grows with r.
On a GPU: `--device cuda --precision bf16 --batch 8 --seq 512` (autocast over float32 weights,
as `loralab train --precision bf16` trains; timings synchronise the device).
`--compile` puts every contender, the floor included, through torch.compile first (as
`loralab train --compile` does), so the ratios compare compiled steps with a compiled floor.
`--reuse-memory` has malloc keep freed memory for every contender, as `loralab train` does on the CPU
(loralab.host_memory): the steps no longer fault their large tensors' pages in again each time.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import describe, interleaved, markdown_table, randomise_lora_b, synchronizer
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.devices import PRECISIONS, autocast, resolve_device
from loralab.host_memory import reuse_freed_memory
from loralab.profiling import saved_tensor_megabytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_shape(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    return model


def make_models(base: torch.nn.Module, dora: bool, r: int = 16) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = copy.deepcopy(base)
    ll.add_adapter(ours, ll.AdapterSpec(method="dora" if dora else "lora", r=r, alpha=32, targets=TARGETS))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=32, target_modules=TARGETS,
                                                            use_dora=dora))
    randomise_lora_b(ours, theirs)
    return ours, theirs


def compiled(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    # Dynamo keeps one cache per code object: five models of one class, trained and run for
    # inference, need more entries than its default 8, past which it would quietly run eager.
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(model) if on else model


def warmup_calls(args: argparse.Namespace) -> int:
    """Untimed calls per contender: a compiled step settles after its third (gradients and
    requires_grad differ between the first calls, and each difference is a recompile)."""
    return 4 if args.compile else 2


def step_fn(model: torch.nn.Module, ids: torch.Tensor, floor: bool = False, precision: str = "fp32"):
    embed = model.get_input_embeddings()
    trained = [p for p in model.parameters() if p.requires_grad]  # what an optimiser's zero_grad visits

    def step() -> None:
        h = embed(ids).detach().requires_grad_(floor)  # the floor needs something to differentiate
        with autocast(ids.device, precision):
            loss = model(inputs_embeds=h, labels=ids).loss
        loss.backward()
        for p in trained:
            p.grad = None

    return step


def forward_fn(model: torch.nn.Module, ids: torch.Tensor, precision: str = "fp32"):
    def fwd() -> None:
        with torch.inference_mode(), autocast(ids.device, precision):
            model(input_ids=ids)

    return fwd


def rank_sweep(base: torch.nn.Module, ids: torch.Tensor, ranks: list[int], args: argparse.Namespace) -> None:
    rounds, p = args.rounds, args.precision
    contenders = {"floor": step_fn(compiled(base, args.compile), ids, floor=True, precision=p)}
    for r in ranks:
        ours, theirs = (compiled(m, args.compile) for m in make_models(base, dora=False, r=r))
        contenders[f"loralab r={r}"], contenders[f"peft r={r}"] = step_fn(ours, ids, precision=p), step_fn(theirs, ids,
                                                                                                          precision=p)
    times = interleaved(contenders, "floor", rounds=rounds, repeats=1, warmup=warmup_calls(args),
                        sync=synchronizer(ids.device))
    table = [[str(r), f"{times[f'loralab r={r}']['ratio']:.3f}x", f"{times[f'peft r={r}']['ratio']:.3f}x"]
             for r in ranks]
    print(f"LoRA train step by rank, {rounds} interleaved rounds, floor {times['floor']['seconds'] * 1000:.0f} ms")
    print(markdown_table(["r", "loralab / floor", "PEFT / floor"], table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=21, help="one step per contender per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, … (auto: the GPU when there is one)")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="autocast over float32 weights for every contender")
    ap.add_argument("--ranks", type=int, nargs="+", help="time only the LoRA train step, at each of these ranks")
    ap.add_argument("--compile", action="store_true", help="torch.compile every contender (no memory table then)")
    ap.add_argument("--reuse-memory", action="store_true",
                    help="malloc keeps freed memory for every contender, as `loralab train` has it on the CPU")
    args = ap.parse_args()
    if args.reuse_memory and not reuse_freed_memory():
        ap.error("--reuse-memory needs glibc's malloc")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = smollm2_shape(args.layers).to(device)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    if args.ranks:
        rank_sweep(base, ids, args.ranks, args)
        return
    lora_ours, lora_peft = (compiled(m, args.compile) for m in make_models(base, dora=False))
    dora_ours, dora_peft = (compiled(m, args.compile) for m in make_models(base, dora=True))
    base = compiled(base, args.compile)
    p, sync = args.precision, synchronizer(device)

    def race(anchor: str, anchor_fn, fn, ours: torch.nn.Module, theirs: torch.nn.Module):
        named = {anchor: anchor_fn, "loralab": fn(ours, ids, precision=p), "peft": fn(theirs, ids, precision=p)}
        return interleaved(named, anchor, rounds=args.rounds, repeats=1, warmup=warmup_calls(args), sync=sync)

    floor = step_fn(base, ids, floor=True, precision=p)
    rows = []
    train = race("floor", floor, step_fn, lora_ours, lora_peft)
    rows.append(["LoRA train step", train["loralab"], train["peft"], train["floor"]])
    dora = race("floor", floor, step_fn, dora_ours, dora_peft)
    rows.append(["DoRA train step", dora["loralab"], dora["peft"], dora["floor"]])
    base_forward = forward_fn(base, ids, precision=p)
    infer = race("base", base_forward, forward_fn, lora_ours, lora_peft)
    rows.append(["LoRA unmerged inference", infer["loralab"], infer["peft"], infer["base"]])
    infer = race("base", base_forward, forward_fn, dora_ours, dora_peft)
    rows.append(["DoRA unmerged inference", infer["loralab"], infer["peft"], infer["base"]])

    def mem(model, floor=False):
        h = model.get_input_embeddings()(ids).detach().requires_grad_(floor)
        with autocast(device, p):
            return saved_tensor_megabytes(lambda: model(inputs_embeds=h, labels=ids).loss)

    table = [[name, f"{o['ratio']:.3f}x", f"{q['ratio']:.3f}x", f"{q['ratio'] / o['ratio']:.2f}x",
              f"{f['seconds'] * 1000:.1f} ms"] for name, o, q, f in rows]
    print(f"SmolLM2-135M shape ({args.layers} layers), batch {args.batch}x{args.seq}, LoRA r=16 on 7 projections, "
          f"{describe(device, args.threads)}, {p}{', torch.compile' if args.compile else ''}"
          f"{', freed memory reused' if args.reuse_memory else ''}, "
          f"median of {args.rounds} interleaved rounds, one step each")
    print(markdown_table(["contender", "loralab / floor", "PEFT / floor", "loralab speed-up over PEFT", "floor"],
                         table))
    if args.compile:  # saved-tensor hooks do not see inside a compiled graph
        return
    print()
    mem_rows = [[name, f"{mem(m, floor):.0f} MB"] for name, m, floor in [
        ("frozen base (floor)", base, True), ("loralab LoRA", lora_ours, False), ("PEFT LoRA", lora_peft, False),
        ("loralab DoRA", dora_ours, False), ("PEFT DoRA", dora_peft, False)]]
    print(markdown_table(["activation memory kept for backward", "MB"], mem_rows))


if __name__ == "__main__":
    main()
