"""The serving engine against offline generation: greedy output of every request equals
`model.generate(do_sample=False)` on that request alone with its adapter loaded by
`ll.load_adapter`, while batches mix adapters, base rows and rows that join later; plus
sampling, stop strings, streaming, cancellation and requests that fail alone."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from test_serve_batched_lora import SPECS, one_thread, reference, run_alone, save_lora, tiny_llama  # noqa: F401

import loralab as ll
from loralab.serve.engine import Completion, Engine, QueueFull, RequestError, RequestFailed, TokenEvent
from loralab.serve.pool import AdapterPool, PoolBusy
from loralab.serve.sampling import Sampler, SamplingParams

ADAPTERS = [None, *SPECS]


class CharTokenizer:
    """Token i reads as one letter; 2 is the end-of-sequence token and reads as nothing."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i == 2 else chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base model, adapter root, reference model holding every adapter)."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llama()
    for i, (name, spec) in enumerate(SPECS.items()):
        save_lora(base, root / name, spec, seed=i)
    return base, root, reference(base, root, SPECS)


def make_engine(setup, max_loaded=3, **kwargs) -> Engine:
    base, root, _ = setup
    model = copy.deepcopy(base)
    kwargs.setdefault("prefetch", False)
    return Engine(model, CharTokenizer(), AdapterPool(root, max_loaded, model=model), **kwargs)


def offline(ref, prompt, adapter, max_new_tokens):
    out = run_alone(ref, adapter, lambda: ref.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                                       do_sample=False))
    return out[0, len(prompt):].tolist()


def prompts(n, seed=0, lo=1, hi=12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def run(engine, handles):
    while engine.has_work():
        engine.step()
    return [h.result(timeout=0) for h in handles]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_equals_offline_generation_while_requests_join_and_leave(setup, attention):
    base, root, ref = setup
    model = copy.deepcopy(base)
    model.config._attn_implementation = attention
    engine = Engine(model, None, AdapterPool(root, 3, model=model), max_batch=3, prefetch=False)
    reqs = [(p, ADAPTERS[i % 4], SamplingParams(max_tokens=3 + i % 6)) for i, p in enumerate(prompts(10))]
    handles = [engine.submit(*r) for r in reqs[:5]]
    for _ in range(4):  # the later requests join a batch already decoding
        engine.step()
    handles += [engine.submit(*r) for r in reqs[5:]]
    for (prompt, adapter, params), out in zip(reqs, run(engine, handles)):
        assert out.token_ids == offline(ref, prompt, adapter, params.max_tokens), (adapter, prompt)
        assert out.finish_reason == "length"
    assert engine.running() == 0 and engine.cache.rows == 0


def test_generate_convenience_and_base_only_engine(setup):
    base, _, ref = setup
    reqs = [(p, None, SamplingParams(max_tokens=4)) for p in prompts(4, seed=3)]
    long_prompt = prompts(1, seed=4, lo=60, hi=61)[0]  # the context (64) ends after 4 new tokens
    reqs.append((long_prompt, None, SamplingParams(max_tokens=10)))
    outs = Engine(copy.deepcopy(base), max_batch=2).generate(reqs)
    assert [o.token_ids for o in outs[:4]] == [offline(ref, p, None, 4) for p, _, _ in reqs[:4]]
    assert outs[4].token_ids == offline(ref, long_prompt, None, 4) and outs[4].finish_reason == "length"


def test_eos_ends_a_request_as_offline_generation_does(setup):
    base, _, ref = setup
    prompt = prompts(1, seed=5)[0]
    free = offline(ref, prompt, "all8", 8)
    eos = free[3]
    engine = make_engine(setup)
    engine.eos_ids = {eos}
    out = engine.generate([(prompt, "all8", SamplingParams(max_tokens=8))])[0]
    ll.set_active(ref, "all8")
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=eos)[0, len(prompt):]
    assert out.token_ids == want.tolist() == free[: free.index(eos) + 1] and out.finish_reason == "stop"
    ignored = engine.generate([(prompt, "all8", SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    assert ignored.token_ids == free


def test_sampling_is_reproducible_and_independent_of_the_batch(setup):
    prompt = prompts(1, seed=7)[0]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    alone = make_engine(setup).generate([(prompt, "all8", params)])[0].token_ids
    others = [(p, ADAPTERS[i % 4], SamplingParams(max_tokens=6, temperature=1.2, seed=i))
              for i, p in enumerate(prompts(4, seed=8))]
    mixed = make_engine(setup, max_batch=5).generate([*others[:2], (prompt, "all8", params), *others[2:]])[2]
    assert mixed.token_ids == alone
    reseeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=6)
    assert make_engine(setup).generate([(prompt, "all8", reseeded)])[0].token_ids != alone


def test_sampler_applies_temperature_top_k_and_top_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def draws(**kw):
        sampler = Sampler(SamplingParams(seed=0, **{"temperature": 1.0, **kw}))
        return [sampler(logits) for _ in range(2000)]

    assert set(draws(top_p=0.5)) == {0}
    assert set(draws(top_p=0.75)) == {0, 1}
    assert set(draws(top_k=3)) == {0, 1, 2}
    counts = torch.bincount(torch.tensor(draws()), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)
    assert Sampler(SamplingParams())(logits) == 0  # greedy
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)


def test_stop_strings_end_the_text_and_streamed_pieces_add_up(setup):
    _, _, ref = setup
    prompt = prompts(1, seed=11)[0]
    text = CharTokenizer().decode(offline(ref, prompt, "head4", 10))
    cut = next(k for k in range(3, len(text) - 1) if text.find(text[k : k + 2]) == k)
    stop = text[cut : cut + 2]  # two tokens, first seen at `cut`
    engine = make_engine(setup)
    seen = []
    handle = engine.submit(prompt, "head4", SamplingParams(max_tokens=10, stop=[stop]), on_event=seen.append)
    out = run(engine, [handle])[0]
    assert out.text == text[:cut] and out.finish_reason == "stop"
    streamed = list(handle.stream(timeout=0))
    assert "".join(e.text for e in streamed) == out.text
    assert [e.token_id for e in streamed] == out.token_ids
    assert seen[:-1] == streamed and isinstance(seen[-1], Completion)


def test_a_bad_request_fails_alone(setup):
    base, root, ref = setup
    shutil.copytree(root / "qv2", root / "broken")
    weights = root / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    engine = make_engine(setup, max_queue=4)
    with pytest.raises(RequestError, match="unknown adapter 'qv3'; did you mean: qv2"):
        engine.submit([5, 6], "qv3")
    with pytest.raises(RequestError, match="the prompt has 64 tokens but the context holds 64"):
        engine.submit([5] * 64)
    good = prompts(2, seed=12)
    handles = [engine.submit(good[0], "all8", SamplingParams(max_tokens=5)),
               engine.submit([7, 8, 9], "broken", SamplingParams(max_tokens=5)),
               engine.submit(good[1], None, SamplingParams(max_tokens=5))]
    engine.submit([1, 2])
    with pytest.raises(QueueFull, match="max_queue"):
        engine.submit([1, 2])
    outs = run(engine, handles)
    assert outs[1].finish_reason == "error" and "truncated or corrupt" in outs[1].error
    with pytest.raises(RequestFailed, match="truncated or corrupt"):
        list(handles[1].stream(timeout=0))
    assert outs[0].token_ids == offline(ref, good[0], "all8", 5)
    assert outs[2].token_ids == offline(ref, good[1], None, 5)


def test_cancelling_frees_the_row_and_the_adapter_at_once(setup):
    _, _, ref = setup
    engine = make_engine(setup, max_loaded=2, max_batch=2)
    ps = prompts(3, seed=13)
    a = engine.submit(ps[0], "all8", SamplingParams(max_tokens=20))
    b = engine.submit(ps[1], "qv2", SamplingParams(max_tokens=6))
    waiting = engine.submit(ps[2], "head4", SamplingParams(max_tokens=6))
    engine.step()
    engine.step()
    with pytest.raises(PoolBusy):  # both slots are held by running requests
        engine.pool.acquire("head4")
    a.cancel()
    assert a.result(timeout=0).finish_reason == "cancelled" and len(a.token_ids) == 2
    assert engine.running() == 1 and engine.cache.rows == 1
    engine.pool.release(engine.pool.acquire("head4"))  # a's slot is free again
    waiting.cancel()
    assert waiting.result(timeout=0).finish_reason == "cancelled" and engine.waiting() == 0
    assert run(engine, [b])[0].token_ids == offline(ref, ps[1], "qv2", 6)


def test_background_loop_streams_tokens_to_other_threads(setup):
    _, root, ref = setup
    engine = make_engine(setup, prefetch=True, max_loaded=2)
    engine.start()
    try:
        reqs = [(p, ADAPTERS[i % 4], SamplingParams(max_tokens=5)) for i, p in enumerate(prompts(6, seed=14))]
        handles = [engine.submit(*r) for r in reqs]
        events = [list(h.stream(timeout=30)) for h in handles]
        engine.pool.register("late", root / "qv2")  # added while serving
        late = engine.submit(reqs[1][0], "late", SamplingParams(max_tokens=5))
        late_tokens = [e.token_id for e in late.stream(timeout=30)]
    finally:
        engine.stop()
    for (prompt, adapter, _), stream, h in zip(reqs, events, handles):
        assert all(isinstance(e, TokenEvent) for e in stream)
        assert [e.token_id for e in stream] == h.token_ids == offline(ref, prompt, adapter, 5)
    assert late_tokens == handles[1].token_ids


@pytest.mark.slow
def test_smollm2_three_adapters_in_one_batch_equal_offline_greedy(tmp_path):
    from loralab.zoo.models import load_base

    base, tok = load_base("smollm2-135m")
    specs = {"attn8": ll.AdapterSpec(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
             "mlp16": ll.AdapterSpec(r=16, alpha=16, targets=["gate_proj", "up_proj", "down_proj"]),
             "all4": ll.AdapterSpec(r=4, alpha=8, targets="all-linear", rslora=True)}
    torch.manual_seed(0)  # A's initialisation
    for i, (name, spec) in enumerate(specs.items()):
        model = copy.deepcopy(base)
        ll.add_adapter(model, spec, "x")
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        ll.save_adapter(model, tmp_path / name, "x")
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot",
             "Photosynthesis is the process", "My favourite recipe for pancakes"]
    reqs = [(tok(t)["input_ids"], a, SamplingParams(max_tokens=12))
            for t, a in zip(texts, [*specs, None, "attn8"])]
    model = copy.deepcopy(base)
    outs = Engine(model, tok, AdapterPool(tmp_path, 3, model=model), max_batch=8).generate(reqs)
    ref = reference(base, tmp_path, specs)
    wants = [offline(ref, p, a, 12) for p, a, _ in reqs]
    assert [o.token_ids for o in outs] == wants
    for (prompt, adapter, _), want in zip(reqs, wants):  # every adapter changes its row's greedy output
        assert adapter is None or want != offline(ref, prompt, None, 12), adapter
