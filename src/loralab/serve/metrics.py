"""Server counters and their Prometheus text exposition (format 0.0.4) for `GET /metrics`."""

from __future__ import annotations

import threading
import time
from collections import deque

from loralab.serve.engine import Engine


class ServerMetrics:
    """Generated tokens (total and over the last `window` seconds) and finished requests by outcome.

    `token()` and `finished()` are called from the engine's thread, `render()` from the server's."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.tokens_total = 0
        self.prompt_tokens_total = 0
        self.requests: dict[str, int] = {}
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()

    def token(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens_total += 1
            self._recent.append(now)

    def finished(self, outcome: str, prompt_tokens: int) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1
            self.prompt_tokens_total += prompt_tokens

    def tokens_per_second(self) -> float:
        cutoff = time.monotonic() - self.window
        with self._lock:
            while self._recent and self._recent[0] < cutoff:
                self._recent.popleft()
            return len(self._recent) / self.window

    def render(self, engine: Engine) -> str:
        rows: list[tuple[str, str, str, list[tuple[str, float]]]] = [
            ("queue_depth", "gauge", "Requests waiting to join the running batch.", [("", engine.waiting())]),
            ("running_batch_size", "gauge", "Requests in the running batch.", [("", engine.running())]),
            ("generated_tokens_total", "counter", "Tokens generated.", [("", self.tokens_total)]),
            ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", self.prompt_tokens_total)]),
            ("tokens_per_second", "gauge", f"Tokens generated per second over the last {self.window:g} s.",
             [("", self.tokens_per_second())]),
            ("requests_total", "counter", "Finished requests by outcome.",
             [(f'{{outcome="{k}"}}', v) for k, v in sorted(self.requests.items())]),
        ]
        if engine.pool is not None:
            s = engine.pool.stats()
            rows += [
                ("adapter_pool_hits_total", "counter", "Requests whose adapter was resident.", [("", s.hits)]),
                ("adapter_pool_misses_total", "counter", "Adapters loaded for a request.", [("", s.misses)]),
                ("adapter_pool_evictions_total", "counter", "Adapters evicted to make room.", [("", s.evictions)]),
                ("adapter_pool_load_errors_total", "counter", "Adapter loads that failed.", [("", s.load_errors)]),
                ("adapter_pool_registered", "gauge", "Adapters registered.", [("", s.registered)]),
                ("adapter_pool_loaded", "gauge", "Adapters resident.", [("", s.loaded)]),
                ("adapter_pool_bytes", "gauge", "Bytes of the resident adapters' factors.", [("", s.bytes_resident)]),
                ("adapter_pool_allocated_bytes", "gauge", "Bytes of the stacked adapter slots.",
                 [("", s.bytes_allocated)]),
            ]
        lines = []
        for name, kind, doc, samples in rows:
            lines += [f"# HELP loralab_{name} {doc}", f"# TYPE loralab_{name} {kind}"]
            lines += [f"loralab_{name}{labels} {value:g}" for labels, value in samples]
        return "\n".join(lines) + "\n"
