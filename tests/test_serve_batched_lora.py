"""Mixed-adapter LoRA: the BGMV and SGMV kernels against a per-row loop, and a whole model whose
batch mixes adapters (different ranks and targets, rsLoRA, per-layer ranks and scales, the output
head) and base rows against the same model running each adapter alone through `ll.load_adapter`.

The helpers here (tiny Llama, random adapters on disk) are shared by the other serve tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll
from loralab.serve import batched_lora
from loralab.serve.batched_lora import (
    RowSlots,
    SlotFactors,
    add_bgmv,
    add_sgmv,
    add_slot_grid,
    choose_kernel,
    rank_class,
)
from loralab.serve.pool import AdapterPool

SPECS = {  # different ranks, target sets and scalings in one batch
    "qv2": ll.AdapterSpec(r=2, alpha=4, targets=["q_proj", "v_proj"]),
    "all8": ll.AdapterSpec(r=8, alpha=8, targets="all-linear"),
    "head4": ll.AdapterSpec(r=4, alpha=16, targets=["o_proj", "down_proj", "lm_head"], rslora=True),
    "ranked": ll.AdapterSpec(r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 6},
                             alpha_pattern={"down_proj": 12}),  # per-layer r and alpha
}


@pytest.fixture(autouse=True)
def one_thread():
    """Two intra-op threads on a shared 2-core machine stall on each other; one is steadier and faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                         "pad_token_id": 0, **config})
    return LlamaForCausalLM(cfg).eval()


def save_lora(base: torch.nn.Module, folder: Path, spec: ll.AdapterSpec, seed: int) -> Path:
    """A PEFT-format adapter with random, non-zero B (so every layer it targets changes)."""
    model = copy.deepcopy(base)
    ll.add_adapter(model, spec, "x")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return ll.save_adapter(model, folder, "x")


def reference(base: torch.nn.Module, root: Path, names) -> torch.nn.Module:
    """The base model with every adapter attached through loralab's own loader."""
    ref = copy.deepcopy(base)
    for name in names:
        ll.load_adapter(ref, root / name, name)
    return ref


def run_alone(ref: torch.nn.Module, adapter: str | None, fn):
    """fn() with only `adapter` active on `ref` (None: the base model)."""
    if adapter is None:
        with ll.disabled(ref):
            return fn()
    ll.set_active(ref, adapter)
    return fn()


@pytest.mark.parametrize("kernel", [add_bgmv, add_sgmv, add_slot_grid])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("slots", [[2, -1, 0, 2, 1, -1, 0, 4, 5, 3, 4],
                                   [5, 2, -1, 2, 5, 3, 0, 0, 4, 4]])  # rank class 8's grid full, two rows a place
def test_kernels_give_each_row_its_own_adapter(kernel, tokens, slots):
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 16, generator=g), torch.randn(12, r, generator=g), s)  # rank classes 4, 8 and 2
               for r, s in ((3, 1.0), (4, 0.5), (8, 2.0), (2, 1.0), (4, 1.5), (7, 0.5))]
    stacked = SlotFactors.stack(factors)
    stacked.clear(1)  # an empty slot (an adapter without this layer) adds nothing, and leaves a hole
    x = torch.randn(len(slots), tokens, 16, generator=g)
    base_out = torch.randn(len(slots), tokens, 12, generator=g)
    out = base_out.clone()
    kernel(out, x, stacked, RowSlots(slots))
    for i, slot in enumerate(slots):
        want = base_out[i].clone()
        if slot not in (-1, 1):
            a, b, s = factors[slot]
            want += s * x[i] @ a.T @ b.T
        torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4)


def test_rank_classes_hold_each_adapter_once_and_reuse_freed_places():
    stacked = SlotFactors(4, 8, 6, torch.float32)
    a0, b0 = torch.randn(2, 8), torch.randn(6, 2)
    stacked.write(0, a0, b0, 3.0)
    stacked.write(2, torch.randn(5, 8), torch.randn(6, 5), 1.0)
    stacked.write(3, torch.randn(7, 8), torch.randn(6, 7), 1.0)
    assert rank_class(2) == 2 and rank_class(5) == 8 and rank_class(8) == 8 and rank_class(9) == 16
    assert sorted(stacked.classes) == [2, 8] and stacked.where == [(2, 0), None, (8, 0), (8, 1)]
    assert stacked.classes[8].a.shape[1:] == (8, 8) and stacked.ranks == [2, 0, 5, 7]
    torch.testing.assert_close(stacked.pairs[0][1].T @ stacked.pairs[0][0].T, 3.0 * b0 @ a0)
    assert not stacked.classes[8].a[0, 5:].any()  # padding up to the class's capacity stays zero
    stacked.clear(2)  # its place is zeroed and given to the next adapter of that class
    assert not stacked.classes[8].a[0].any()
    stacked.write(1, torch.randn(6, 8), torch.randn(6, 6), 1.0)
    assert stacked.where[1] == (8, 0)
    stacked.write(0, torch.randn(16, 8), torch.randn(6, 16), 1.0)  # a new rank moves the slot's class
    assert sorted(stacked.classes) == [8, 16] and stacked.where[0] == (16, 0)  # the emptied class is gone
    assert stacked.allocated_bytes() == 4 * sum(t.numel() for t in stacked.tensors())


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_rule(monkeypatch, threads):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    stacked = SlotFactors.stack([(torch.randn(r, 4), torch.randn(4, r), 1.0) for r in (8, 16, 64)])
    assert choose_kernel(RowSlots([0, 1]), stacked) is add_bgmv
    assert choose_kernel(RowSlots([0, 0, 1]), stacked) is add_sgmv  # rows share an adapter
    assert choose_kernel(RowSlots([0, 2]), stacked) is add_sgmv  # rank 64 in use
    many = SlotFactors.stack([(torch.randn(r, 4), torch.randn(4, r), 1.0) for r in (8, 16, 32, 64) * 4])
    equal = SlotFactors.stack([(torch.randn(32, 4), torch.randn(4, 32), 1.0)] * 16)
    assert choose_kernel(RowSlots(range(16)), equal) is add_slot_grid  # 16 adapters of one rank
    small = SlotFactors.stack([(torch.randn(16, 4), torch.randn(4, 16), 1.0)] * 16)
    assert choose_kernel(RowSlots(range(16)), small) is add_slot_grid  # decode: the grid
    assert choose_kernel(RowSlots(range(16)), small, tokens=16) is add_slot_grid  # a prefill too
    assert choose_kernel(RowSlots([4, 5]), small) is add_slot_grid  # one rank class: 2 adapters are enough
    sparse = RowSlots([0, 15])  # but not when most of the range between them is unread padding
    assert choose_kernel(sparse, small) is add_bgmv and choose_kernel(sparse, small, tokens=16) is add_bgmv
    assert choose_kernel(RowSlots(range(16)), many) is add_slot_grid  # rank classes: no padding read
    half = choose_kernel(RowSlots(range(0, 16, 2)), equal)  # every other place: half of what it reads is unused
    assert half is (add_slot_grid if threads > 1 else add_sgmv)
    assert choose_kernel(RowSlots(range(0, 16, 4)), equal) is add_sgmv  # a quarter of the range in use
    assert choose_kernel(RowSlots(range(8)), many) is add_sgmv  # 8 adapters, but 2 per rank class
    assert choose_kernel(RowSlots(range(16)), many, tokens=16) is add_slot_grid  # a short prefill
    assert choose_kernel(RowSlots(range(16)), many, tokens=64) is add_sgmv  # a long one: not measured to win
    assert choose_kernel(RowSlots(list(range(16)) * 5), many) is add_slot_grid  # 5 rows on every slot: a full grid
    assert choose_kernel(RowSlots([*range(16)] + [0] * 8), equal) is add_sgmv  # 9 rows on one: most cells empty


def test_kernel_rule_on_a_gpu(monkeypatch):
    monkeypatch.setattr(batched_lora, "runs_on_gpu", lambda rows: True)
    one_class = SlotFactors.stack([(torch.randn(16, 4), torch.randn(4, 16), 1.0)] * 16)
    assert choose_kernel(RowSlots([3] * 8), one_class) is add_sgmv  # one adapter: one launch per step of SGMV
    assert choose_kernel(RowSlots([0, 15]), one_class) is add_slot_grid  # two: the grid, padding and all
    assert choose_kernel(RowSlots(range(16)), one_class, tokens=64) is add_sgmv  # a long prefill: not measured
    many = SlotFactors.stack([(torch.randn(r, 4), torch.randn(4, r), 1.0) for r in (8, 16, 32, 64) * 4])
    assert choose_kernel(RowSlots([0, 1, 2, 3]), many) is add_sgmv  # one adapter in each of four rank classes
    assert choose_kernel(RowSlots(range(8)), many) is add_slot_grid  # two in each
    assert choose_kernel(RowSlots([-1, -1]), many) is add_sgmv  # base rows only


@pytest.mark.parametrize("kernel", [None, add_bgmv, add_sgmv, add_slot_grid])
def test_mixed_batch_matches_each_adapter_alone(tmp_path, monkeypatch, kernel):
    if kernel is not None:  # every layer through this kernel, whatever the rule would pick
        monkeypatch.setattr(batched_lora, "choose_kernel", lambda rows, factors, tokens=1: kernel)
    base = tiny_llama()
    for i, (name, spec) in enumerate(SPECS.items()):
        save_lora(base, tmp_path / name, spec, seed=i)
    ref = reference(base, tmp_path, SPECS)
    model = copy.deepcopy(base)
    pool = AdapterPool(tmp_path, max_loaded=len(SPECS), model=model)
    slots = {None: -1} | {name: pool.acquire(name).slot for name in SPECS}
    rows = [None, "qv2", "all8", "ranked", "head4", "all8", None, "ranked", "qv2"]
    ids = torch.randint(1, 64, (len(rows), 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pool.rows.assign([slots[r] for r in rows])
        got = model(input_ids=ids).logits
        for i, adapter in enumerate(rows):
            want = run_alone(ref, adapter, lambda i=i: ref(input_ids=ids[i : i + 1]).logits[0])
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
            if adapter is not None:  # the adapter really changes this row
                assert not torch.allclose(got[i], base(input_ids=ids[i : i + 1]).logits[0], atol=1e-3)
