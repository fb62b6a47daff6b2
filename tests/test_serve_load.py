"""A small run of bench/load_test.py: concurrent streaming requests over ten adapters, on
127.0.0.1, bounded in count; every request must succeed and stream its tokens."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
from pathlib import Path

import pytest
from test_serve_batched_lora import SPECS, one_thread, save_lora, tiny_llama  # noqa: F401
from transformers import AutoTokenizer

from loralab.serve.server import BackgroundServer, build_engine
from loralab.zoo.models import resolve


def load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[1] / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bounded_load_over_ten_adapters_has_no_errors(tmp_path):
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"), local_files_only=True)
    base = tiny_llama(vocab_size=len(tok), max_position_embeddings=128, eos_token_id=tok.eos_token_id)
    specs = list(SPECS.values())
    names = [f"user{i}" for i in range(10)]
    for i, name in enumerate(names):
        save_lora(base, tmp_path / name, specs[i % len(specs)], seed=i)
    engine = build_engine(copy.deepcopy(base), tok, tmp_path, max_loaded=4, max_batch=8, max_queue=64)
    load_test = load_test_module()
    with BackgroundServer(engine, tok, "tiny") as server:
        stats = asyncio.run(load_test.run_load(server.url, names + ["tiny"], ["Hello there", "The news today:"],
                                               requests=40, concurrency=8, max_tokens=8))
        generated = server.app.state.metrics.tokens_total
    assert stats["errors"] == []
    assert stats["chunks"] > 0 and generated >= stats["chunks"]
    assert engine.pool.stats().evictions > 0  # ten adapters through four slots
    print(load_test.report(stats, generated))
