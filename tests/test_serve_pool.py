"""AdapterPool: LRU eviction, pinning, in-use protection, prefetch, removal, refusing folders
outside the root, and bad files that leave the pool untouched."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from test_serve_batched_lora import SPECS, one_thread, reference, run_alone, save_lora, tiny_llama  # noqa: F401

import loralab as ll
from loralab.serve.batched_lora import BatchedLoRALinear
from loralab.serve.engine import Engine, SamplingParams
from loralab.serve.pool import AdapterLoadError, AdapterNotFound, AdapterPool, PoolBusy, PoolPinned

LORA = ll.AdapterSpec(r=2, alpha=4, targets=["q_proj", "v_proj"])


@pytest.fixture
def four(tmp_path):
    """A tiny base model and adapters a, b, c, d under tmp_path."""
    base = tiny_llama()
    for i, name in enumerate("abcd"):
        save_lora(base, tmp_path / name, LORA, seed=i)
    return base, tmp_path


def cycle(pool: AdapterPool, *names: str) -> None:
    for name in names:
        pool.release(pool.acquire(name))


def stacks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {p: torch.cat([t.flatten() for t in m.factors.tensors()]).clone()
            for p, m in model.named_modules() if isinstance(m, BatchedLoRALinear)}


def test_least_recently_used_adapter_is_evicted(four):
    base, root = four
    pool = AdapterPool(root, max_loaded=2, model=copy.deepcopy(base))
    assert sorted(pool.names()) == ["a", "b", "c", "d"] and pool.resident() == []
    cycle(pool, "a", "b", "a")  # b is now the least recently used
    slot_b = pool.slot_of("b")
    cycle(pool, "c")
    assert pool.resident() == ["a", "c"] and pool.slot_of("b") is None and pool.slot_of("c") == slot_b
    cycle(pool, "d")
    assert pool.resident() == ["c", "d"]
    s = pool.stats()
    assert (s.hits, s.misses, s.evictions, s.loaded) == (1, 4, 2, 2)
    assert s.bytes_resident == 2 * sum(t.numel() * t.element_size() for t in ll.read_tensors(root / "a").values())


def test_pinned_and_in_use_adapters_are_never_evicted(four):
    base, root = four
    pool = AdapterPool(root, max_loaded=2, model=copy.deepcopy(base))
    pool.pin("a")
    cycle(pool, "b", "c", "d")
    assert "a" in pool.resident() and pool.stats().pinned == 1
    held = pool.acquire("b")  # the other slot is now in use
    with pytest.raises(PoolBusy, match="in use"):
        pool.acquire("c")
    pool.release(held)
    pool.pin("b")
    with pytest.raises(PoolPinned, match="unpin one or raise max_loaded"):
        pool.acquire("c")
    pool.unpin("a")
    cycle(pool, "c")
    assert sorted(pool.resident()) == ["b", "c"]


def test_prefetch_fills_slots_without_evicting_what_it_loads(four):
    base, root = four
    pool = AdapterPool(root, max_loaded=2, model=copy.deepcopy(base))
    assert pool.prefetch(["c", "nope", "d", "a"]) == ["c", "d"]  # the third would evict one of the first two
    assert pool.stats().prefetched == 2
    cycle(pool, "c")
    assert pool.stats().hits == 1


def test_remove_frees_the_slot_after_its_last_user(four):
    base, root = four
    pool = AdapterPool(root, max_loaded=2, model=copy.deepcopy(base))
    lease = pool.acquire("a")
    pool.remove("a")
    with pytest.raises(AdapterNotFound, match="unknown adapter 'a'"):
        pool.acquire("a")
    assert pool.resident() == ["a"]  # still serving the running request
    pool.release(lease)
    assert pool.resident() == [] and not any(t.any() for m in pool.model.modules()
                                              if isinstance(m, BatchedLoRALinear) for t in m.factors.tensors())
    pool.register("a2", root / "a")  # added while running
    cycle(pool, "a2")


def test_folders_outside_the_root_are_refused(four, tmp_path_factory):
    base, root = four
    outside = tmp_path_factory.mktemp("elsewhere")
    save_lora(base, outside / "e", LORA, seed=9)
    (root / "link").symlink_to(outside / "e")
    pool = AdapterPool(root, max_loaded=2, model=copy.deepcopy(base), discover=False)
    for name, folder in (("e", outside / "e"), ("../elsewhere/e", None), ("link", None)):
        with pytest.raises(ValueError, match="outside the pool's root"):
            pool.register(name, folder)
    assert pool.names() == []


def test_a_corrupt_or_mismatched_file_leaves_the_pool_unchanged(four, tmp_path_factory):
    base, root = four
    shutil.copytree(root / "a", root / "corrupt")
    weights = root / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    save_lora(tiny_llama(hidden_size=48), root / "wide", LORA, seed=0)  # made for another base model
    pool = AdapterPool(root, max_loaded=2, model=copy.deepcopy(base))
    cycle(pool, "a", "b")
    before, resident, stats = stacks(pool.model), pool.resident(), pool.stats()
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        pool.acquire("corrupt")
    with pytest.raises(AdapterLoadError, match=r"q_proj.lora_A.weight has shape \[2, 48\].*needs \[2, 32\]"):
        pool.acquire("wide")
    after = stacks(pool.model)
    assert pool.resident() == resident and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    s = pool.stats()
    assert (s.evictions, s.bytes_resident, s.load_errors) == (stats.evictions, stats.bytes_resident, 2)


def test_adapters_the_batched_path_cannot_serve_are_rejected_with_the_reason(four):
    base, root = four
    save_lora(base, root / "dora", ll.AdapterSpec(method="dora", r=2, targets=["q_proj"]), seed=0)
    config = json.loads((root / "a" / "adapter_config.json").read_text())
    (root / "saved").mkdir()
    (root / "saved" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    pool = AdapterPool(root, max_loaded=2, model=copy.deepcopy(base))
    assert set(pool.rejected) == {"dora", "saved"}
    assert "method 'dora'" in pool.rejected["dora"] and "modules_to_save" in pool.rejected["saved"]
    assert "dora" not in pool


def test_a_thousand_adapters_through_a_pool_of_64(tmp_path):
    """1,000 registered adapters (copies of 4 distinct ones), 64 resident at most, served by the engine."""
    base = tiny_llama()
    originals = tmp_path / "originals"
    for i, (name, spec) in enumerate([*SPECS.items(), ("qv2b", LORA)]):
        save_lora(base, originals / name, spec, seed=i)
    kinds = list(SPECS) + ["qv2b"]
    for i in range(1000):
        shutil.copytree(originals / kinds[i % 4], tmp_path / "zoo" / f"user{i:04d}")
    model = copy.deepcopy(base)
    pool = AdapterPool(tmp_path / "zoo", max_loaded=64, model=model)
    assert len(pool) == 1000
    engine = Engine(model, pool=pool, max_batch=16, prefetch=False)
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, 1000, (240,), generator=gen).tolist()
    prompts = [torch.randint(1, 64, (5,), generator=gen).tolist() for _ in picks]
    outs = engine.generate([(p, f"user{i:04d}", SamplingParams(max_tokens=2)) for p, i in zip(prompts, picks)])
    ref = reference(base, originals, kinds)
    for prompt, i, out in zip(prompts, picks, outs):
        want = run_alone(ref, kinds[i % 4], lambda p=prompt: ref.generate(torch.tensor([p]), max_new_tokens=2,
                                                                       do_sample=False))
        assert out.token_ids == want[0, 5:].tolist(), out
    s = pool.stats()
    assert s.loaded == 64 and s.hits + s.misses == 240 and s.evictions == s.misses - 64
