"""A bounded load test of `loralab serve` on 127.0.0.1: many streaming requests over many adapters.

    .venv/bin/python bench/load_test.py [--requests 300] [--concurrency 32] [--adapters 50] [--max-tokens 16]

Starts the HTTP server in this process on the embedded SmolLM2 with `--adapters` random LoRA
adapters (ranks 8-64 on q/k/v/o, written to a temporary folder, a pool of `--max-loaded`),
then sends `--requests` streaming completions through the official `openai` client, at most
`--concurrency` at a time, each to a random adapter (a tenth to the base model). Prints errors,
latency and time-to-first-token percentiles and the token throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


async def _one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            tokens += 1
            first = first or time.perf_counter() - start
    end = time.perf_counter() - start
    return end, first if first is not None else end, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_load(url: str, models: list[str], prompts: list[str], requests: int, concurrency: int,
                   max_tokens: int, seed: int = 0) -> dict:
    """Send `requests` streaming completions to `url`, `concurrency` at a time; latency stats and errors."""
    import openai

    rng = random.Random(seed)
    jobs = [(rng.choice(models), rng.choice(prompts)) for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []
    done: list[tuple[float, float, int]] = []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        async def job(model: str, prompt: str) -> None:
            async with gate:
                try:
                    done.append(await _one(client, model, prompt, max_tokens))
                except Exception as err:  # every failure is counted and shown, none stops the test
                    errors.append(f"{model}: {type(err).__name__}: {err}")

        start = time.perf_counter()
        await asyncio.gather(*(job(m, p) for m, p in jobs))
        wall = time.perf_counter() - start
    latency, ttft = [d[0] for d in done], [d[1] for d in done]
    return {"requests": requests, "errors": errors, "wall_s": wall, "chunks": sum(d[2] for d in done),
            "p50_latency_s": percentile(latency, 0.5), "p99_latency_s": percentile(latency, 0.99),
            "p50_ttft_s": percentile(ttft, 0.5), "p99_ttft_s": percentile(ttft, 0.99),
            "mean_latency_s": statistics.fmean(latency) if latency else float("nan")}


def report(stats: dict, generated_tokens: float) -> str:
    return (f"{stats['requests']} requests, {len(stats['errors'])} errors, {stats['wall_s']:.1f} s; "
            f"latency p50 {stats['p50_latency_s']:.2f} s, p99 {stats['p99_latency_s']:.2f} s; "
            f"time to first token p50 {stats['p50_ttft_s']:.2f} s, p99 {stats['p99_ttft_s']:.2f} s; "
            f"{generated_tokens / stats['wall_s']:.1f} tokens/s")


def main() -> None:
    from serve import make_adapters

    from loralab.serve.server import BackgroundServer, build_engine
    from loralab.zoo import load_base, load_task

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--max-loaded", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [row["text"][:200] for row in load_task("agnews", max_test=64).test]
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_base("smollm2-135m")
        names = make_adapters(model, Path(tmp), args.adapters)
        engine = build_engine(model, tok, tmp, args.max_loaded, args.max_batch, max_queue=args.requests)
        with BackgroundServer(engine, tok, "smollm2-135m") as server:
            models = names + ["smollm2-135m"] * max(1, len(names) // 10)
            stats = asyncio.run(run_load(server.url, models, prompts, args.requests, args.concurrency,
                                         args.max_tokens))
            generated = server.app.state.metrics.tokens_total
            pool = engine.pool.stats()
    print(report(stats, generated))
    print(f"adapter pool: {pool.hits} hits, {pool.misses} misses, {pool.evictions} evictions "
          f"({args.adapters} adapters, {args.max_loaded} loaded at most)")
    for line in stats["errors"][:10]:
        print("error:", line)


if __name__ == "__main__":
    main()
