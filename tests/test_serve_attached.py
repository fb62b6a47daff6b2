"""Serving adapters the pool's slots cannot hold (DoRA, VeRA, a LoRAMoE mixture, a LoRA with trainable
token rows, a MeteoRA router over two LoRA experts) next to pooled LoRA adapters, in the same batches.

The reference for every request is offline greedy generation (`model.generate`) with that adapter
alone, loaded by loralab's own loader; the engine serves them from one model through the core
per-row path, mixed with pooled adapters and base rows, with a pool too small to hold them all.
"""

from __future__ import annotations

import copy
import shutil

import httpx
import pytest
import torch
from test_serve_batched_lora import SPECS, one_thread, run_alone, save_lora  # noqa: F401
from test_serve_engine import offline, prompts, run
from test_serve_http import BASE, tiny_base_with_loras

import loralab as ll
from loralab.compose import add_router
from loralab.serve.engine import SamplingParams
from loralab.serve.pool import AdapterPool
from loralab.serve.server import BackgroundServer, build_engine

ATTACHED = {
    "dora": ll.AdapterSpec(method="dora", r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "vera": ll.AdapterSpec(method="vera", r=8, targets=["o_proj", "up_proj"]),
    "moe": ll.AdapterSpec(method="loramoe", r=2, targets=["q_proj", "down_proj"], options={"experts": 3, "top_k": 2}),
    "tokens": ll.AdapterSpec(r=4, targets=["k_proj"], trainable_token_indices=list(range(3, 64, 2))),
}
EXPERTS = ["e1", "e2"]


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every trainable parameter random and non-zero, so each adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def save_method(base, folder, spec, seed):
    model = copy.deepcopy(base)
    ll.add_adapter(model, spec, "x")
    randomise(model, seed)
    return ll.save_adapter(model, folder, "x")


def save_router(base, root, seed):
    model = copy.deepcopy(base)
    for e in EXPERTS:
        ll.load_adapter(model, root / e, e)
    add_router(model, EXPERTS, name="router", top_k=1)
    randomise(model, seed)  # only the gate trains
    return ll.save_adapter(model, root / "router", "router")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(base model, adapter root, reference model holding every adapter)."""
    tok, base, root = tiny_base_with_loras(tmp_path_factory)
    for i, e in enumerate(EXPERTS):
        save_lora(base, root / e, ll.AdapterSpec(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"]), seed=10 + i)
    for i, (name, spec) in enumerate(ATTACHED.items()):
        save_method(base, root / name, spec, seed=20 + i)
    save_router(base, root, seed=30)
    ref = copy.deepcopy(base)
    for name in [*SPECS, *EXPERTS, *ATTACHED, "router"]:
        ll.load_adapter(ref, root / name, name)
    return base, root, ref, tok


ALL = [None, *SPECS, *ATTACHED, "router", *EXPERTS]


def test_build_engine_attaches_what_the_pool_cannot_hold(world):
    base, root, *_ = world
    engine = build_engine(copy.deepcopy(base), None, root, max_loaded=2)
    assert engine.attached == {*ATTACHED, "router", *EXPERTS}  # the router's experts come with it
    assert sorted(engine.pool.names()) == sorted(SPECS) and not engine.pool.rejected
    assert engine.adapter_names() == sorted(engine.attached) + engine.pool.names()


def test_each_request_in_a_mixed_batch_gets_what_its_adapter_gives_alone(world):
    base, root, ref, _ = world
    engine = build_engine(copy.deepcopy(base), None, root, max_loaded=2, max_batch=6)
    engine.prefetch = False
    reqs = [(p, ALL[i % len(ALL)], SamplingParams(max_tokens=4 + i % 3)) for i, p in enumerate(prompts(18, seed=3))]
    handles = [engine.submit(*r) for r in reqs[:8]]
    engine.step()  # the rest join a batch already decoding
    handles += [engine.submit(*r) for r in reqs[8:]]
    outs = run(engine, handles)
    for (prompt, adapter, params), out in zip(reqs, outs):
        assert out.finish_reason == "length", out.error
        assert out.token_ids == offline(ref, prompt, adapter, params.max_tokens), adapter
    distinct = {tuple(offline(ref, reqs[0][0], a, 4)) for a in ALL}
    assert len(distinct) >= len(ALL) - 1  # the adapters really differ, so the comparison can fail


def test_attached_adapters_are_inactive_outside_their_rows(world):
    base, root, ref, _ = world
    engine = build_engine(copy.deepcopy(base), None, root, max_loaded=2)
    prompt = prompts(1, seed=5)[0]
    (out,) = engine.generate([(prompt, None, SamplingParams(max_tokens=5))])
    assert out.token_ids == offline(ref, prompt, None, 5)
    with torch.no_grad():
        want = run_alone(ref, None, lambda: ref(torch.tensor([prompt])).logits)
        assert torch.equal(engine.model(torch.tensor([prompt])).logits, want)


def test_name_clashes_between_attached_and_pooled_adapters_are_refused(world):
    base, root, *_ = world
    model = copy.deepcopy(base)
    ll.load_adapter(model, root / "qv2", "qv2", activate=False)
    with pytest.raises(ValueError, match="attached to the model"):
        AdapterPool(root, 2, model=model, discover=False).register("qv2")
    pool = AdapterPool(root, 2, model=model)
    assert "qv2" not in pool and "all8" in pool  # discovery leaves the attached name alone


def test_a_router_without_its_experts_is_reported_not_served(world, tmp_path):
    base, root, *_ = world
    lonely = tmp_path / "adapters"
    shutil.copytree(root / "router", lonely / "router")
    engine = build_engine(copy.deepcopy(base), None, lonely, max_loaded=2)
    assert "router" not in engine.attached and "expert adapters ['e1', 'e2']" in engine.pool.rejected["router"]


def test_http_lists_serves_and_keeps_attached_adapters(world):
    base, root, ref, tok = world
    engine = build_engine(copy.deepcopy(base), tok, root, max_loaded=2, max_batch=4)
    with BackgroundServer(engine, tok, BASE) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert listed == {BASE, *SPECS, *ATTACHED, "router", *EXPERTS}
        prompt = tok("Once upon a time", add_special_tokens=False)["input_ids"]
        for adapter in ["moe", "router", "dora"]:
            got = http.post("/v1/completions", json={"model": adapter, "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0}).json()
            want = tok.decode(offline(ref, prompt, adapter, 6), skip_special_tokens=True)
            assert got["choices"][0]["text"] == want, adapter
        gone = http.delete("/v1/adapters/moe")
        assert gone.status_code == 409 and "attached" in gone.json()["error"]["message"]
        clash = http.post("/v1/adapters", json={"name": "vera", "path": "qv2"})
        assert clash.status_code == 409
