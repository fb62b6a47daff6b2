"""reuse_freed_memory against the kernel's own count of page faults, and which commands call it."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest

import loralab.host_memory
from loralab.cli import main
from loralab.devices import resolve_device

# Allocates and fills a 64 MB tensor (above glibc's largest mmap threshold) once, then six more times, and
# prints the minor page faults of each of those: each fill faults the tensor's pages in again unless malloc
# kept them. (A step may still grow the heap once, where something small took the start of the freed space.)
STEPS = """
import resource, sys, torch
from loralab.host_memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults[1:])
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own tuning, if set
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, env=env, check=True)
    applied, *faults = out.stdout.split()
    return applied, statistics.median(int(f) for f in faults)


def test_freed_pages_are_reused_instead_of_faulted_in_again():
    applied, reused = _faults_per_step("reuse")
    if applied != "True":
        pytest.skip("not glibc: reuse_freed_memory leaves malloc as it is")
    _, default = _faults_per_step("default")
    assert default >= 64 // 2  # at least one fault per page, even with 2 MB pages
    assert reused < default / 10


def _not_loaded(*args, **kwargs):
    raise ValueError("no model is loaded in this test")


ON_CPU_BY_DEFAULT = int(resolve_device("auto").type == "cpu")  # (auto picks a GPU where there is one)


@pytest.mark.parametrize(("argv", "calls"), [(["eval"], ON_CPU_BY_DEFAULT), (["eval", "--release-memory"], 0),
                                             (["eval", "--device", "cpu"], 1), (["generate", "--prompt", ""], 0)])
def test_training_and_evaluating_commands_keep_freed_memory_on_the_cpu(argv, calls, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(loralab.host_memory, "reuse_freed_memory", lambda: seen.append(True))
    monkeypatch.setattr("loralab.loading.load_with_adapter", _not_loaded)  # generate: not a loop of like steps
    assert main(argv) == 2  # eval without data stops with an error after the set-up, which is all this looks at
    assert len(seen) == calls
