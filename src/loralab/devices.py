"""Where and in which precision the work runs: `--device` and `--precision` for every command.

`resolve_device("auto")` picks CUDA when torch sees a GPU, then Apple's MPS, else the CPU; a
named device that is not there is refused with what is. `autocast(device, precision)` is
mixed precision as torch does it: the weights (base and adapter) stay in float32, the matrix
products run in bfloat16 or float16; float16 needs a gradient scaler (`grad_scaler`), bfloat16
does not.
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): cuda if available, then mps, else cpu; otherwise the named device, if it exists.
    Under torchrun a bare "cuda" (or auto's) is this process's own GPU, cuda:LOCAL_RANK."""
    found = available_devices()
    if name is None or str(name) == "auto":
        name = "cuda" if "cuda" in found else "mps" if "mps" in found else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {str(name)!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type != "cpu" and str(device) not in found:
        raise ValueError(f"device {str(device)!r} is not available to this torch ({torch.__version__}); "
                         f"available: {', '.join(found)}")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """None, a torch dtype, or one of float32 / bfloat16 / float16."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's mixed-precision context (a no-op for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (whose small gradients would underflow); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
