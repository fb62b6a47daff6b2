"""The OpenAI-compatible HTTP API, driven by the official `openai` client on 127.0.0.1.

The reference for every served completion is offline greedy generation (`model.generate`)
with that adapter alone, loaded by loralab's own loader; the model is a tiny Llama with the
embedded SmolLM2 tokenizer, so prompts, chat templates and streaming are real text.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from test_serve_batched_lora import SPECS, one_thread, reference, run_alone, save_lora, tiny_llama  # noqa: F401
from transformers import AutoTokenizer

from loralab.serve.api import create_app
from loralab.serve.engine import Engine
from loralab.serve.pool import AdapterPool
from loralab.serve.server import BackgroundServer
from loralab.zoo.models import resolve

BASE = "tiny-llama"
CONTEXT = 96
PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hello"]


def tiny_base_with_loras(tmp_path_factory):
    """(SmolLM2's tokenizer, a tiny Llama with its vocabulary, a folder with the SPECS adapters saved)."""
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"), local_files_only=True)
    base = tiny_llama(vocab_size=len(tok), max_position_embeddings=CONTEXT, eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, spec) in enumerate(SPECS.items()):
        save_lora(base, root / name, spec, seed=i)
    return tok, base, root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(server, openai client, tokenizer, reference model holding every adapter, adapter root)."""
    tok, base, root = tiny_base_with_loras(tmp_path_factory)
    model = copy.deepcopy(base)
    engine = Engine(model, tok, AdapterPool(root, 2, model=model), max_batch=4, max_queue=64)
    server = BackgroundServer(engine, tok, BASE).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield server, client, tok, reference(base, root, SPECS), root, base
    server.stop()


def offline(ref, tok, prompt_ids: list[int], adapter: str | None, max_tokens: int) -> str:
    torch.manual_seed(0)
    out = run_alone(ref, adapter, lambda: ref.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                                                       do_sample=False, pad_token_id=tok.pad_token_id))
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return ids(tok, text)


def model_name(adapter: str | None) -> str:
    return adapter or BASE


@pytest.mark.parametrize("adapter", [None, *SPECS])
def test_served_greedy_completion_equals_offline_generation(world, adapter):
    server, client, tok, ref, *_ = world
    for prompt in PROMPTS[:2]:
        got = client.completions.create(model=model_name(adapter), prompt=prompt, max_tokens=10, temperature=0)
        want = offline(ref, tok, ids(tok, prompt), adapter, 10)
        assert got.choices[0].text == want
        assert got.usage.prompt_tokens == len(ids(tok, prompt))
        assert got.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_mixing_adapters_each_get_their_own_answer(world):
    server, client, tok, ref, *_ = world
    jobs = [(PROMPTS[i % len(PROMPTS)], [None, *SPECS][i % 4]) for i in range(10)]

    def ask(job):
        prompt, adapter = job
        return client.completions.create(model=model_name(adapter), prompt=prompt, max_tokens=8,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [offline(ref, tok, ids(tok, p), a, 8) for p, a in jobs]


def test_chat_streaming_adds_up_to_the_offline_answer(world):
    server, client, tok, ref, *_ = world
    messages = [{"role": "user", "content": "Name a colour."}]
    want = offline(ref, tok, chat_ids(tok, "Name a colour."), "all8", 12)
    stream = client.chat.completions.create(model="all8", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    whole = client.chat.completions.create(model="all8", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == want


def test_completion_streaming_and_seeded_sampling(world):
    server, client, tok, *_ = world
    kwargs = dict(model="qv2", prompt="Hello", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == first


def test_models_lists_the_base_and_every_adapter(world):
    server, client, *_ = world
    assert {m.id for m in client.models.list()} >= {BASE, *SPECS}


def test_unknown_model_is_404_naming_the_adapters(world):
    server, client, *_ = world
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="all9", prompt="x", max_tokens=2)
    body = err.value.body
    assert body["code"] == "model_not_found" and "all8" in body["message"] and "qv2" in body["message"]


@pytest.mark.parametrize(("payload", "needle"), [
    (b"{not json", "not valid JSON"),
    (json.dumps({"prompt": "hi"}).encode(), "missing required field 'model'"),
    (json.dumps({"model": BASE}).encode(), "missing required field 'prompt'"),
    (json.dumps({"model": BASE, "prompt": "hi", "max_tokens": "5"}).encode(), "'max_tokens' must be an integer"),
    (json.dumps({"model": BASE, "prompt": "hi", "n": 3}).encode(), "'n'=3 is not supported"),
    (json.dumps({"model": BASE, "prompt": "hi", "temprature": 0}).encode(), "unknown field(s): temprature"),
    (json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 500}).encode(), f"the context holds {CONTEXT}"),
    (json.dumps({"model": BASE, "prompt": "word " * 200}).encode(), f"the context holds {CONTEXT}"),
])
def test_bad_requests_get_400_saying_what_is_wrong(world, payload, needle):
    server = world[0]
    r = httpx.post(server.url + "/v1/completions", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_adapters_are_added_checked_and_removed_while_serving(world, tmp_path):
    server, client, tok, ref, root, base = world
    shutil.copytree(root / "qv2", root / "extra" / "copy")
    r = httpx.post(server.url + "/v1/adapters", json={"name": "copy", "path": "extra/copy"})
    assert r.status_code == 201, r.text
    got = client.completions.create(model="copy", prompt="Hello", max_tokens=6, temperature=0).choices[0].text
    assert got == offline(ref, tok, ids(tok, "Hello"), "qv2", 6)
    assert httpx.post(server.url + "/v1/adapters", json={"name": "copy", "path": "qv2"}).status_code == 409
    assert httpx.delete(server.url + "/v1/adapters/copy").status_code == 200
    assert httpx.delete(server.url + "/v1/adapters/copy").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="copy", prompt="Hello", max_tokens=2)

    outside = tmp_path / "outside"
    shutil.copytree(root / "qv2", outside)
    for path in (str(outside), "../" + outside.name, "qv2/../../" + outside.name):
        r = httpx.post(server.url + "/v1/adapters", json={"name": "escape", "path": path})
        assert r.status_code == 400 and "outside the adapter root" in r.json()["error"]["message"]


def test_a_corrupt_or_misshapen_adapter_is_422_and_nothing_is_registered(world):
    server, client, tok, ref, root, base = world
    shutil.copytree(root / "qv2", root / "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    wide = tiny_llama(vocab_size=base.config.vocab_size, hidden_size=64, max_position_embeddings=CONTEXT)
    save_lora(wide, root / "wide", SPECS["qv2"], seed=0)
    for name, needle in (("corrupt", "cannot be loaded"), ("wide", "shape")):
        r = httpx.post(server.url + "/v1/adapters", json={"name": name, "path": name})
        assert r.status_code == 422, r.text
        assert needle in r.json()["error"]["message"]
        assert name not in {m.id for m in client.models.list()}


def test_one_failing_request_does_not_fail_the_others_in_its_batch(world):
    server, client, tok, ref, root, base = world
    shutil.copytree(root / "all8", root / "rots")
    assert httpx.post(server.url + "/v1/adapters", json={"name": "rots", "path": "rots"}).status_code == 201
    (root / "rots" / "adapter_model.safetensors").write_bytes(b"\x00rotten after registration")

    def ask(adapter):
        try:
            return client.completions.create(model=adapter, prompt="Hello", max_tokens=6, temperature=0
                                             ).choices[0].text
        except openai.APIStatusError as err:
            return err.status_code

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, ["qv2", "rots", "all8", "rots"]))
    assert answers == [offline(ref, tok, ids(tok, "Hello"), "qv2", 6), 422,
                       offline(ref, tok, ids(tok, "Hello"), "all8", 6), 422]


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_tokens_and_pool_traffic(world):
    server, client, *_ = world
    before = _metrics(server)
    for name in ("loralab_queue_depth", "loralab_running_batch_size", "loralab_tokens_per_second",
                 "loralab_adapter_pool_hits_total", "loralab_adapter_pool_evictions_total",
                 "loralab_adapter_pool_bytes"):
        assert name in before
    client.completions.create(model="head4", prompt="Hello", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = _metrics(server)
    assert after["loralab_generated_tokens_total"] - before["loralab_generated_tokens_total"] == 5
    pool_traffic = ("loralab_adapter_pool_hits_total", "loralab_adapter_pool_misses_total")
    assert sum(after[k] - before[k] for k in pool_traffic) == 1
    assert after['loralab_requests_total{outcome="length"}'] == before.get('loralab_requests_total{outcome="length"}',
                                                                           0) + 1


def test_a_client_leaving_mid_stream_frees_its_row(world):
    server = world[0]
    body = {"model": "all8", "prompt": "Hello", "max_tokens": 80, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
        assert server.engine.running() == 1
    deadline = time.monotonic() + 10  # a bound for a stalled server, not a speed check
    while server.engine.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.running() == 0
    assert httpx.get(server.url + "/health").json()["running"] == 0


def test_a_full_queue_answers_429(world):
    _, _, tok, _, root, base = world
    model = copy.deepcopy(base)
    engine = Engine(model, tok, AdapterPool(root, 1, model=model), max_batch=1, max_queue=2)  # never stepped
    for _ in range(2):
        engine.submit(ids(tok, "Hello"))
    with TestClient(create_app(engine, tok, BASE)) as http:
        r = http.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
