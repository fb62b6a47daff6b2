"""Generation throughput of the multi-adapter engine on SmolLM2-135M against the naive ways.

N LoRA adapters (ranks cycling 8, 16, 32, 64 on the q/k/v/o projections, random non-zero B)
serve `--requests` AG News prompts whose adapters are assigned round-robin (every adapter
equally often, so a batch of at least N requests mixes all N), drawn uniformly at random, or by
Zipf popularity (p ∝ 1/rank). Contenders, timed round by round in rotating order (bench/common.py), each
producing exactly `--max-tokens` greedy tokens per request (EOS ignored):

- engine: `loralab.serve.Engine`, every request with its own adapter, all in one batch;
- engine, one adapter: the same batch with every request on one adapter (the goal: mixing
  N adapters costs little against this);
- HF base: `model.generate` of the base model alone on the left-padded batch;
- PEFT: `PeftModel` holding the N adapters, `model.generate(..., adapter_names=[...])`
  (skipped above `--peft-max` adapters: PEFT keeps every adapter resident);
- merge per adapter: a naive server that merges each adapter of the batch into the weights,
  generates its requests, and unmerges.

Speeds are median per-round ratios. `--registered 1000` also pushes requests for 1,000
registered adapters through a pool of 64 and counts errors, misses and evictions. `--kernels`
instead times the BGMV, SGMV and slot-grid kernels on SmolLM2 layer shapes, the measurement behind
`loralab.serve.batched_lora.choose_kernel`.
Run: `.venv/bin/python bench/serve.py` (about 10 minutes with the defaults). On a GPU:
`--device cuda --dtype bfloat16` (`--base` takes any local HF folder of a Llama-family model).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from common import describe, interleaved, markdown_table, synchronizer

import loralab as ll
from loralab.checkpoint import read_config, read_tensors, spec_from_config
from loralab.devices import DTYPES, resolve_device, resolve_dtype
from loralab.serve.batched_lora import RowSlots, SlotFactors, add_bgmv, add_sgmv, add_slot_grid, choose_kernel
from loralab.serve.engine import Engine, SamplingParams
from loralab.serve.pool import AdapterPool
from loralab.zoo import load_task

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = (8, 16, 32, 64)


def make_adapters(base: torch.nn.Module, root: Path, n: int) -> list[str]:
    names = []
    for i in range(n):
        name = f"user{i:03d}"
        ll.add_adapter(base, ll.AdapterSpec(r=RANKS[i % len(RANKS)], alpha=16, targets=TARGETS), "x")
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in base.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        ll.save_adapter(base, root / name, "x")
        ll.remove_adapter(base, "x")
        names.append(name)
    return names


def prompts(tok, count: int, tokens: int) -> list[list[int]]:
    texts = [row["text"] for row in load_task("agnews", max_test=count).test]
    return [tok(t)["input_ids"][:tokens] for t in texts]


def popularity(names: list[str], count: int, kind: str, seed: int = 0) -> list[str]:
    if kind == "round-robin":
        return [names[i % len(names)] for i in range(count)]
    weights = torch.ones(len(names)) if kind == "uniform" else 1.0 / torch.arange(1, len(names) + 1)
    picks = torch.multinomial(weights, count, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [names[i] for i in picks.tolist()]


def hf_generate(model, tok, ids: list[list[int]], max_tokens: int, last: dict, **kwargs):
    """A timed call that leaves its generated tokens per request in last["tokens"]."""
    batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)

    def run():
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kwargs)
        last["tokens"] = out[:, batch["input_ids"].shape[1]:].tolist()

    return run


def engine_generate(engine: Engine, ids: list[list[int]], adapters: list[str | None], max_tokens: int, last: dict):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def run():
        last["tokens"] = [o.token_ids for o in engine.generate([(p, a, params) for p, a in zip(ids, adapters)])]

    return run


def read_factors(model: torch.nn.Module, folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight of the layer, s·B A) for every layer the adapter in `folder` targets."""
    scale = spec_from_config(read_config(folder)).scale
    tensors = read_tensors(folder)
    pairs = [(model.get_submodule(key.split(".lora_A")[0]).weight, scale * tensors[key.replace("lora_A", "lora_B")]
              @ a) for key, a in tensors.items() if ".lora_A." in key]
    return [(w, delta.to(w.device, w.dtype)) for w, delta in pairs]


def merge_per_adapter(model, tok, ids: list[list[int]], chosen: list[str], deltas: dict, max_tokens: int):
    """The naive server: for each adapter in the batch, merge it, generate its requests, unmerge."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(chosen):
        groups.setdefault(name, []).append(i)

    def run():
        with torch.inference_mode():
            for name, rows in groups.items():
                for weight, delta in deltas[name]:
                    weight.add_(delta)
                hf_generate(model, tok, [ids[i] for i in rows], max_tokens, {})()
                for weight, delta in deltas[name]:
                    weight.sub_(delta)

    return run


def serve_table(args) -> None:
    from peft import PeftModel

    base, tok = ll.load_base(args.base, device=args.device, dtype=args.dtype)
    tok.padding_side = "left"
    ids = prompts(tok, args.requests, args.prompt_tokens)
    tokens = args.requests * args.max_tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_adapters(base, root, max(args.adapters))
        plain = copy.deepcopy(base)
        merged = copy.deepcopy(base)
        for n in args.adapters:
            served = copy.deepcopy(plain)  # the pool wraps its layers
            engine = Engine(served, tok, AdapterPool(root, min(n, 64), model=served, discover=False),
                            max_batch=args.requests)
            for name in names[:n]:
                engine.pool.register(name)
            peft = None
            if n <= args.peft_max:
                peft = PeftModel.from_pretrained(copy.deepcopy(plain), root / names[0], adapter_name=names[0])
                for name in names[1:n]:
                    peft.load_adapter(root / name, adapter_name=name)
            for kind in args.popularity if n > 1 else ("uniform",):
                chosen = popularity(names[:n], args.requests, kind)
                deltas = {name: read_factors(merged, root / name) for name in set(chosen)}
                ours, theirs = {}, {}
                contenders = {
                    "engine": engine_generate(engine, ids, chosen, args.max_tokens, ours),
                    "engine, one adapter": engine_generate(engine, ids, [names[0]] * len(ids), args.max_tokens, {}),
                    "HF base": hf_generate(plain, tok, ids, args.max_tokens, {}),
                }
                if not args.no_merge:
                    contenders["merge per adapter"] = merge_per_adapter(merged, tok, ids, chosen, deltas,
                                                                        args.max_tokens)
                if peft is not None:
                    contenders["PEFT"] = hf_generate(peft, tok, ids, args.max_tokens, theirs, adapter_names=chosen)
                res = interleaved(contenders, "engine", rounds=args.rounds, repeats=1, warmup=1, sync=args.sync)
                agree = f"{sum(o == p for o, p in zip(ours['tokens'], theirs['tokens']))}/{len(ids)}" if peft else "–"
                speed = {c: tokens / res[c]["seconds"] for c in res}
                rows.append([str(n), kind, str(len(set(chosen))), f"{speed['engine']:.0f}",
                             f"{res['engine, one adapter']['ratio']:.2f}x",
                             f"{res['PEFT']['ratio']:.2f}x" if peft else "–",
                             f"{res['merge per adapter']['ratio']:.2f}x" if not args.no_merge else "–",
                             f"{res['HF base']['ratio']:.2f}x",
                             agree])
                print(rows[-1], flush=True)
        if args.registered:
            rows.append(registered_run(plain, tok, root, names, ids, args))
    print(f"\n{args.base}, {args.requests} requests x {args.max_tokens} greedy tokens, "
          f"prompts of {args.prompt_tokens} tokens, LoRA ranks {RANKS} on {', '.join(TARGETS)}, "
          f"{where(args)}, median of {args.rounds} interleaved rounds")
    print(markdown_table(["adapters", "popularity", "distinct in batch", "engine tok/s",
                          "engine speed vs one adapter", "speed-up over PEFT", "speed-up over merge per adapter",
                          "speed vs HF base", "greedy tokens equal to PEFT's"], rows))


def registered_run(plain, tok, root: Path, names: list[str], ids: list[list[int]], args) -> list[str]:
    """`args.registered` adapter names (over the folders made) served through a pool of 64: errors, misses."""
    served = copy.deepcopy(plain)
    engine = Engine(served, tok, AdapterPool(root, 64, model=served, discover=False), max_batch=args.requests)
    registered = [f"tenant{i:04d}" for i in range(args.registered)]
    for i, name in enumerate(registered):
        engine.pool.register(name, root / names[i % len(names)])
    chosen = popularity(registered, 8 * len(ids), "zipf", seed=1)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    out = engine.generate([(ids[i % len(ids)], a, params) for i, a in enumerate(chosen)])
    errors = sum(o.finish_reason == "error" for o in out)
    stats = engine.pool.stats()
    print(f"{args.registered} registered, pool of 64: {len(out)} requests, {errors} errors, {stats.hits} hits, "
          f"{stats.misses} misses, {stats.evictions} evictions", flush=True)
    return [f"{args.registered} registered, 64 loaded", "zipf", str(len(set(chosen))), "–",
            f"{errors} errors in {len(out)} requests", "–", "–", f"{stats.misses} misses, {stats.evictions} evictions",
            "–"]


def where(args) -> str:
    return f"{describe(args.device, args.threads)}, {args.dtype or 'float32'}"


def kernel_table(args) -> None:
    rows = []
    gen = torch.Generator().manual_seed(0)
    like = {"device": args.device, "dtype": resolve_dtype(args.dtype) or torch.float32}
    for d_in, d_out in ((576, 576), (576, 1536), (1536, 576)):
        for label, ranks in (("16", (16,)), ("64", (64,)), ("8–64", RANKS)):
            factors = SlotFactors.stack([(torch.randn(ranks[i % len(ranks)], d_in, **like),
                                          torch.randn(d_out, ranks[i % len(ranks)], **like), 1.0) for i in range(64)])
            for tokens in (1, 16):
                for n in (8, 64):
                    for distinct in sorted({1, n // 4, n}):
                        x, out = torch.randn(n, tokens, d_in, **like), torch.zeros(n, tokens, d_out, **like)
                        rows_ = RowSlots((torch.randperm(n, generator=gen) % distinct).tolist(), args.device)
                        kernels = {name: lambda k=k, o=out, x=x, f=factors, s=rows_: k(o, x, f, s)
                                   for name, k in (("bgmv", add_bgmv), ("sgmv", add_sgmv), ("grid", add_slot_grid))}
                        with torch.inference_mode():
                            res = interleaved(kernels, "sgmv", rounds=args.rounds, repeats=5, sync=args.sync)
                        chosen = choose_kernel(rows_, factors, tokens).__name__.removeprefix("add_")
                        rows.append([f"{d_in}→{d_out}", label, str(tokens), str(n), str(distinct),
                                     f"{res['sgmv']['seconds'] * 1e6:.0f}", f"{res['bgmv']['ratio']:.2f}",
                                     f"{res['grid']['ratio']:.2f}", chosen])
    print(f"Kernels per layer call against SGMV, {where(args)}, median of {args.rounds} interleaved rounds")
    print(markdown_table(["layer", "ranks", "tokens/row", "rows", "distinct adapters", "SGMV µs", "BGMV / SGMV time",
                          "grid / SGMV time", "choose_kernel picks"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--peft-max", type=int, default=64, help="the most adapters PEFT is asked to hold")
    ap.add_argument("--registered", type=int, default=1000, help="adapters registered for the pool run (0: skip)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--popularity", nargs="+", default=["round-robin", "zipf"],
                    choices=["round-robin", "uniform", "zipf"], help="how requests pick their adapters")
    ap.add_argument("--max-tokens", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="1: steadiest on a small shared machine")
    ap.add_argument("--kernels", action="store_true", help="time the BGMV, SGMV and slot-grid kernels instead")
    ap.add_argument("--no-merge", action="store_true", help="skip merge-per-adapter (one generate per adapter: "
                                                             "slow with many adapters in a batch)")
    ap.add_argument("--base", default="smollm2-135m", help="embedded causal LM or a local HF model folder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, … (auto: the GPU when there is one)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: as stored)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    args.sync = synchronizer(args.device)
    (kernel_table if args.kernels else serve_table)(args)


if __name__ == "__main__":
    main()
