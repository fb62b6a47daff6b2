"""Per-request decoding settings and token choice.

Greedy (temperature 0) or sampled with temperature, top-k and nucleus (top-p; Holtzman et
al., arXiv 1904.09751) filtering, applied in that order as transformers applies them. Each
sampled request draws from its own generator seeded from `seed`, so its tokens do not
depend on which other requests share its batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """max_tokens: tokens to generate at most; temperature 0 means greedy; top_k 0 and top_p 1
    switch those filters off; seed makes sampled output reproducible; stop: strings that end
    the output (not included in it); ignore_eos: keep going past the end-of-sequence token."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        checks = (
            (isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
             f"max_tokens must be a positive integer, got {self.max_tokens!r}"),
            (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}"),
            (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer or None, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must hold non-empty strings, got {self.stop!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Chooses one request's next token from its logits with the request's own generator."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab], float."""
        p = self.params
        if p.greedy:
            return int(logits.argmax())
        scores = logits.float() / p.temperature
        if 0 < p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if p.top_p < 1:
            ordered, order = scores.sort(descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked higher
            scores = scores.index_fill(0, order[before >= p.top_p], -math.inf)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))
