"""LoftQ: LoRA-fine-tuning-aware quantisation (Li et al., arXiv 2310.08659).

The base weight is quantised to N bits and the adapter starts with what quantising lost.
Alternating T times (B₀A₀ = 0):

    Q_t = q_N(W − s·B_{t−1}A_{t−1}),    s·B_t A_t = the best rank-r approximation of W − Q_t (SVD),

the base becomes the de-quantised Q_t and the adapter B_t, A_t, so Q + s·BA is closer to W than
q_N(W) alone. Of the T alternations the one with the smallest ‖W − Q_t − s·B_t A_t‖ is kept (the
paper keeps the last; at 2 bits the per-block scales move and the error can creep up after a few
steps), so more iterations never do worse.

q_N is absmax quantisation per block of `block_size` consecutive entries of the [out, in] matrix
(row by row): each block is divided by its largest |entry| and rounded to the nearest of 2^N levels
in [−1, 1]: `quantizer="normal"`, QLoRA's NF levels (normal quantiles, zero included), or
`"uniform"`, evenly spaced. The quantisation is simulated: the base keeps the de-quantised values in
its own dtype, so no memory is saved. The saved adapter applies to the quantised base (as PEFT's
LoftQ adapters do), so keep that base with it: on the original W it gives W + s·BA.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser, low_rank_methods
from loralab.inits.pissa import top_singular
from loralab.methods.base import AdapterMethod
from loralab.progress import over_layers

NF_OFFSET = 0.9677083  # QLoRA's outermost quantile, ½(1/30 + 1/32) in from each tail
QUANTIZERS = ("normal", "uniform")


def levels(bits: int, quantizer: str) -> torch.Tensor:
    """The 2^bits sorted quantisation levels in [−1, 1]."""
    if quantizer == "uniform":
        return torch.linspace(-1.0, 1.0, 2 ** bits, dtype=torch.float64).float()
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (values / values.abs().max()).float()


def quantize(w: torch.Tensor, bits: int, block_size: int, quantizer: str = "normal") -> torch.Tensor:
    """q_N(w), de-quantised, in float32: absmax per block of `block_size` consecutive entries, nearest level."""
    table = levels(bits, quantizer).to(w.device)
    blocks = w.detach().float().reshape(-1, block_size)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    index = torch.bucketize(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny), (table[1:] + table[:-1]) / 2)
    return (table[index] * scale).reshape(w.shape)


def loftq_factors(w: torch.Tensor, r: int, bits: int, iterations: int, block_size: int,
                  quantizer: str = "normal") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, B, A) in float32 with Q + B A ≈ W, B A of rank r: the closest of the `iterations` alternations."""
    w = w.detach().float()
    low = torch.zeros_like(w)
    best: tuple[torch.Tensor, ...] = ()
    for _ in range(iterations):
        q = quantize(w - low, bits, block_size, quantizer)
        u, s, vh = top_singular(w - q, r)
        low = (u * s) @ vh
        error = torch.linalg.matrix_norm(w - q - low)
        if not best or error < best[0]:
            best = (error, q, u * s.sqrt(), s.sqrt()[:, None] * vh)
    return best[1], best[2], best[3]


def _check(options: dict, layers: list[tuple[str, int]]) -> None:
    bits, iterations, size = options["bits"], options["iterations"], options["block_size"]
    for name, value, low, high in (("bits", bits, 2, 8), ("iterations", iterations, 1, None),
                                   ("block_size", size, 1, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            allowed = f"an integer from {low} to {high}" if high else f"an integer ≥ {low}"
            raise ValueError(f"loftq option {name} must be {allowed}, got {value!r}")
    if options["quantizer"] not in QUANTIZERS:
        raise ValueError(f"loftq option quantizer must be one of {', '.join(QUANTIZERS)}, got {options['quantizer']!r}")
    for path, numel in layers:
        if numel % size:
            raise ValueError(f"loftq block_size={size} must divide the {numel} weights of {path}; "
                             "choose a block size that divides every adapted layer's out·in")


@initialiser("loftq", "Base = N-bit quantised W, adapter = rank-r SVD of what quantising lost, alternated",
             "2310.08659", options={"bits": 4, "iterations": 1, "block_size": 64, "quantizer": "normal"})
@torch.no_grad()
def loftq(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    methods = low_rank_methods(adapted, "loftq")
    o = context.options
    _check(o, [(path, m.layer.weight.numel()) for (path, _), m in zip(adapted, methods, strict=True)])
    for method in over_layers(methods, "loftq"):
        layer = method.layer
        q, b, a = loftq_factors(layer.matrix(), method.r, o["bits"], o["iterations"], o["block_size"], o["quantizer"])
        root = method.scale ** 0.5
        method.lora_B.copy_(b / root)
        method.lora_A.copy_(a / root)
        layer.weight.copy_(layer.to_weight(q.to(layer.weight.dtype)))
