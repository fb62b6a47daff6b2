"""Serving many LoRA adapters on one base causal LM.

Mixed-adapter batches over stacked adapter slots (S-LoRA, arXiv 2311.03285; Punica,
arXiv 2310.18547), a pool of many adapters with few resident, and a continuous-batching
engine with a per-row KV cache (vLLM, arXiv 2309.06180):

    pool = AdapterPool("adapters/", max_loaded=32, model=model)
    engine = Engine(model, tokenizer, pool, max_batch=16)
    handle = engine.submit(prompt_ids, "customer-42", SamplingParams(max_tokens=64, temperature=0.7, seed=1))
    engine.start()                      # or call engine.step() yourself
    for event in handle.stream():
        print(event.text, end="")
"""

from loralab.serve.engine import (
    Completion,
    Engine,
    QueueFull,
    RequestError,
    RequestFailed,
    RequestHandle,
    TokenEvent,
)
from loralab.serve.pool import AdapterLoadError, AdapterNotFound, AdapterPool, PoolBusy, PoolPinned, PoolStats
from loralab.serve.sampling import SamplingParams

__all__ = [
    "AdapterLoadError",
    "AdapterNotFound",
    "AdapterPool",
    "Completion",
    "Engine",
    "PoolBusy",
    "PoolPinned",
    "PoolStats",
    "QueueFull",
    "RequestError",
    "RequestFailed",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]
