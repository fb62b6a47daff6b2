"""Keeping freed host memory for reuse: `reuse_freed_memory()`, which `loralab train` calls on the CPU.

glibc's malloc gives an allocation above its mmap threshold (32 MB at most) pages of its own and
hands them back to the OS when it is freed; below that, it shrinks its heap once enough at its top is
free. A training step frees and allocates the same large tensors every step (a causal LM's logits and
their gradients: batch × length × vocabulary floats, 50 MB for SmolLM2 at 2×128 tokens), so every step
faults all their pages in again and the kernel zeroes each 4 KiB page as it does. On this project's
2-core test machine that was 12k–50k page faults a step, and SmolLM2-135M's log-softmax backward took
69–82 ms (median) where it takes 7.5 ms on pages already there.

`reuse_freed_memory()` tells malloc to serve every allocation from its heap and never to shrink it, so
a step after the first reuses pages already faulted in; the process keeps the memory of its largest
step until it exits. PyTorch's CPU launcher (`python -m torch.backends.xeon.run_cpu`) gets the same by
preloading jemalloc or tcmalloc; this is the in-process equivalent, for glibc only. It changes the
whole process, so the library never calls it by itself: the `loralab` commands that train or evaluate
do, on the CPU (`--release-memory` leaves malloc as it is), and a Python script may.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_NEVER = 2**31 - 1  # the largest trim threshold mallopt takes: the heap is never shrunk


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocations (see the module docstring).
    True when it now does; False where the C library is not glibc, which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # noqa: B018 — present in glibc only (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
