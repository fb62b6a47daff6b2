"""`loralab serve`: a base model, a folder of adapters and the HTTP API, run by uvicorn.

    loralab serve --base smollm2-135m --adapters DIR --host 127.0.0.1 --port 8000 --max-loaded 64

`BackgroundServer` runs the same app in a thread (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from torch import nn

from loralab.serve.api import create_app
from loralab.serve.attached import attach_unstackable
from loralab.serve.engine import Engine
from loralab.serve.pool import AdapterPool


def build_engine(model: nn.Module, tokenizer, adapters: str | Path | None, max_loaded: int = 64, max_batch: int = 16,
                 max_queue: int = 256) -> Engine:
    """An engine over `model` with the adapters under `adapters` (None: the base model only): plain LoRA
    in a pool of at most `max_loaded` resident, every other method attached to the model."""
    pool = None
    if adapters is not None:
        _, rejected = attach_unstackable(model, adapters)
        pool = AdapterPool(adapters, max_loaded, model=model)
        pool.rejected.update(rejected)
    return Engine(model, tokenizer, pool, max_batch=max_batch, max_queue=max_queue)


class BackgroundServer:
    """The HTTP API of `engine` on host:port (port 0: a free one), served from a daemon thread."""

    def __init__(self, engine: Engine, tokenizer, base_name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.engine = engine
        self.app = create_app(engine, tokenizer, base_name)
        self.host, self.port = host, port or _free_port(host)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.engine.start()
        self._thread = threading.Thread(target=self._server.run, name="loralab-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(base: str, adapters: str | None, host: str = "127.0.0.1", port: int = 8000, max_loaded: int = 64,
          max_batch: int = 16, max_queue: int = 256, device: str = "auto", dtype: str | None = None) -> None:
    """Load `base` (embedded name or HF folder) on `device` in `dtype`, register the adapters under `adapters`
    and serve until Ctrl-C."""
    import uvicorn

    from loralab.zoo.models import load_base

    model, tokenizer = load_base(base, device=device, dtype=dtype)
    engine = build_engine(model.eval(), tokenizer, adapters, max_loaded, max_batch, max_queue)
    if engine.pool is not None:
        for name, why in engine.pool.rejected.items():
            print(f"loralab serve: skipping {name}: {why}")
        print(f"loralab serve: {len(engine.pool)} LoRA adapters under {engine.pool.root}, at most {max_loaded} loaded"
              + (f"; {len(engine.attached)} others attached ({', '.join(sorted(engine.attached))})"
                 if engine.attached else ""))
    engine.start()
    try:
        uvicorn.run(create_app(engine, tokenizer, base), host=host, port=port, log_level="info")
    finally:
        engine.stop()
