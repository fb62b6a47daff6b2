"""On a CUDA GPU (skipped without one): adapters, mixed rows, the serving kernels and engine, and
mixed-precision training give what the CPU (float32) gives, and adapters trained there reload here."""

from __future__ import annotations

import copy

import pytest
import torch
from test_model import Tiny, ids, mixed_rows_equal_each_adapter_alone, perturb
from test_serve_batched_lora import SPECS, reference, run_alone, save_lora, tiny_llama
from trainer_toy import Toy, adapted_toy, examples

import loralab as ll
from loralab.serve import batched_lora
from loralab.serve.batched_lora import RowSlots, SlotFactors, add_bgmv, add_sgmv, add_slot_grid
from loralab.serve.engine import Engine
from loralab.serve.pool import AdapterPool
from loralab.serve.sampling import SamplingParams
from loralab.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 products in float32 (no TF32), so the GPU and the CPU agree to rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_on_cuda_matches_the_cpu_and_merges_there(method):
    cpu = Tiny()
    ll.add_adapter(cpu, ll.AdapterSpec(method=method, r=4, targets=["q_proj", "v_proj"]), name="a")
    perturb(cpu, "a", 1)
    gpu = copy.deepcopy(cpu).to(CUDA)
    assert all(p.is_cuda for p in gpu.parameters())
    x = ids(6)
    want = cpu(x)
    torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), want, atol=1e-5, rtol=1e-5)
    w0 = gpu.blocks[0]["q_proj"].base_layer.weight.detach().clone()
    ll.merge(gpu, "a")
    torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), want, atol=1e-5, rtol=1e-5)
    ll.unmerge(gpu)
    torch.testing.assert_close(gpu.blocks[0]["q_proj"].base_layer.weight, w0, atol=1e-6, rtol=0)


def test_mixed_rows_on_cuda_equal_each_adapter_alone():
    m, *_ = mixed_rows_equal_each_adapter_alone(CUDA)
    assert all(p.is_cuda for p in m.parameters())


@pytest.mark.parametrize("kernel", [add_bgmv, add_sgmv, add_slot_grid])
@pytest.mark.parametrize("tokens", [1, 5])
def test_serving_kernels_on_cuda(kernel, tokens):
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 16, generator=g), torch.randn(12, r, generator=g), s)
               for r, s in ((3, 1.0), (4, 0.5), (8, 2.0), (2, 1.0), (4, 1.5), (7, 0.5))]
    stacked = SlotFactors.stack([(a.to(CUDA), b.to(CUDA), s) for a, b, s in factors])
    slots = [2, -1, 0, 2, 1, -1, 0, 4, 5, 3, 4]
    x = torch.randn(len(slots), tokens, 16, generator=g)
    base_out = torch.randn(len(slots), tokens, 12, generator=g)
    out = base_out.to(CUDA, copy=True)
    kernel(out, x.to(CUDA), stacked, RowSlots(slots, CUDA))
    for i, slot in enumerate(slots):
        want = base_out[i].clone()
        if slot != -1:
            a, b, s = factors[slot]
            want += s * x[i] @ a.T @ b.T
        torch.testing.assert_close(out[i].cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [None, add_bgmv, add_sgmv, add_slot_grid])
def test_engine_on_cuda_matches_offline_generation(tmp_path, monkeypatch, kernel):
    if kernel is not None:
        monkeypatch.setattr(batched_lora, "choose_kernel", lambda rows, factors, tokens=1: kernel)
    base = tiny_llama()
    for i, (name, spec) in enumerate(SPECS.items()):
        save_lora(base, tmp_path / name, spec, seed=i)
    ref = reference(base, tmp_path, SPECS).to(CUDA)
    model = copy.deepcopy(base).to(CUDA)
    engine = Engine(model, None, AdapterPool(tmp_path, 3, model=model), max_batch=4, prefetch=False)
    gen = torch.Generator().manual_seed(0)
    reqs = [(torch.randint(3, 64, (3 + i,), generator=gen).tolist(), [None, *SPECS][i % 4],
             SamplingParams(max_tokens=5)) for i in range(8)]
    for (prompt, adapter, _), out in zip(reqs, engine.generate(reqs)):
        want = run_alone(ref, adapter, lambda p=prompt: ref.generate(torch.tensor([p], device=CUDA), max_new_tokens=5,
                                                                     do_sample=False))
        assert out.token_ids == want[0, len(prompt):].tolist(), adapter


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_learns_and_the_cpu_reloads_it(tmp_path, precision):
    model = adapted_toy().to(CUDA)
    config = TrainConfig(lr=5e-2, batch_size=16, max_steps=40, progress=False, schedule="constant",
                         precision=precision)
    trainer = Trainer(model, examples(256), examples(128, seed=1), config)
    before = trainer.evaluate()
    after = trainer.train()
    assert after["accuracy"] > max(0.75, before["accuracy"] + 0.2)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.float32)}
    ll.save_adapter(model, tmp_path / "adapter")
    cpu = ll.load_adapter(Toy().eval(), tmp_path / "adapter")
    x = torch.tensor([e["input_ids"] for e in examples(8, seed=2)])
    torch.testing.assert_close(cpu(x), model.eval()(x.to(CUDA)).cpu(), atol=1e-5, rtol=1e-5)
