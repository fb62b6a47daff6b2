"""Shared helpers for the benchmarks: interleaved timing and median per-round ratios.

Back-to-back runs on a small shared machine swing by 20%, so every benchmark times all
contenders round by round (rotating their order) and reports the median of the per-round
ratios to the anchor rather than ratios of totals.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def no_sync() -> None:
    return None


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What `interleaved` calls around each timing so that queued GPU work is counted."""
    return torch.cuda.synchronize if device.type == "cuda" else no_sync


def describe(device: torch.device, threads: int) -> str:
    """The machine a table was measured on, for its caption."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} thread(s)"


def time_once(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = no_sync) -> float:
    """Mean seconds of `repeats` calls (after the caller's warm-up); `sync` waits for queued device work
    (torch.cuda.synchronize on a GPU)."""
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def interleaved(contenders: dict[str, Callable[[], object]], anchor: str, rounds: int = 7, repeats: int = 3,
                warmup: int = 2, sync: Callable[[], None] = no_sync) -> dict[str, dict[str, float]]:
    """{name: {"ratio": median per-round time / anchor time, "seconds": median time}}."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(time_once(contenders[n], repeats, sync))
    out = {}
    for n in names:
        ratios = [t / a for t, a in zip(times[n], times[anchor])]
        out[n] = {"ratio": statistics.median(ratios), "seconds": statistics.median(times[n])}
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def add_run_args(ap: argparse.ArgumentParser, rounds: int = 15) -> None:
    """The options every model benchmark takes: batch shape, rounds and CPU threads."""
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=rounds, help="one step per contender per round")
    ap.add_argument("--threads", type=int, default=2)


def randomise_lora_b(*models: torch.nn.Module, std: float = 0.01) -> None:
    """Non-zero LoRA B factors, so that no path can shortcut a zero update."""
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=std)
