"""Every method on a base layer held in bfloat16 or float16 (as `--dtype bfloat16` or `torch_dtype=`
loads a model): the adapter is made in the weights' dtype, the output keeps it with and without
gradients and in a batch whose rows mix it with the base (the serving path), backward reaches
every trainable parameter, and the output matches the same adapter run in float32 (a float32
copy of the model) within 16-bit precision."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab as ll
from loralab.methods.base import METHODS

ROUTERS = {"meteora", "arrow"}  # route among other adapters by name: covered in test_meteora.py, test_arrow.py


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def adapted(net: nn.Module, method: str, target: str = "layer", dtype: torch.dtype | None = None) -> list:
    """The adapter attached and in eval mode (rank-sampling methods such as DyLoRA train at a random
    rank; eval runs them whole), every trained tensor moved off its start so the update is not zero."""
    ll.add_adapter(net, ll.AdapterSpec(method=method, r=4, targets=[target]), dtype=dtype)
    net.eval()
    trained = [p for p in net.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.add_(0.1 * torch.randn_like(p))
    return trained


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(set(METHODS.names()) - ROUTERS))
def test_method_on_a_16_bit_base(method, dtype):
    torch.manual_seed(0)
    net = Net().to(dtype)
    trained = adapted(net, method)
    x = torch.randn(6, 64, dtype=dtype)
    with torch.no_grad():
        inferred = net(x)
        reference = copy.deepcopy(net).float()(x.float())
    out = net(x)
    assert out.dtype == inferred.dtype == dtype
    torch.testing.assert_close(inferred, out)
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
    rows = ["default", None] * 3
    with torch.no_grad(), ll.row_adapters(net, rows):
        mixed = net(x)
        with ll.disabled(net):
            base = net(x)
    assert mixed.dtype == dtype
    torch.testing.assert_close(mixed[0::2], inferred[0::2], atol=1e-2, rtol=1e-2)  # other op order: rounding
    torch.testing.assert_close(mixed[1::2], base[1::2])
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in trained)


OTHER_KINDS = {"hf-conv1d": (lambda: Conv1D(48, 64), lambda: torch.randn(3, 5, 64)),
               "conv": (lambda: nn.Conv2d(8, 16, 3, padding=1), lambda: torch.randn(2, 8, 6, 6)),
               "embedding": (lambda: nn.Embedding(50, 32), lambda: torch.randint(0, 50, (3, 4)))}


@pytest.mark.parametrize("kind, method", [(k, m) for k in OTHER_KINDS for m in sorted(set(METHODS.names()) - ROUTERS)
                                          if k in METHODS.get(m).layer_kinds])
def test_method_on_other_bfloat16_layer_kinds(kind, method):
    make_layer, make_input = OTHER_KINDS[kind]
    torch.manual_seed(0)
    net = nn.Sequential(make_layer()).to(torch.bfloat16)
    adapted(net, method, target="0")
    x = make_input()
    with torch.no_grad():
        reference = copy.deepcopy(net).float()(x.float() if x.is_floating_point() else x)
    out = net(x.to(torch.bfloat16) if x.is_floating_point() else x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 3e-2 * reference.abs().max()  # bf16 error grows with fan-in
    out.float().square().sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(set(METHODS.names()) - ROUTERS - {"loramoe"}))
def test_merge_on_a_16_bit_base_and_unmerge_restores_it_bit_for_bit(method, dtype):
    """W + ΔW − ΔW in 16 bits is not W: unmerging must give back the very weights, however often."""
    torch.manual_seed(0)
    net = Net().to(dtype)
    original = net.layer.weight.detach().clone()
    adapted(net, method)
    with torch.no_grad():
        x = torch.randn(6, 64, dtype=dtype)
        unmerged = net(x)
        for _ in range(3):
            ll.merge(net)
            torch.testing.assert_close(net(x), unmerged, atol=3e-2, rtol=3e-2)
            ll.unmerge(net)
    assert torch.equal(net.layer.base_layer.weight, original)


@pytest.mark.parametrize("method", sorted(set(METHODS.names()) - ROUTERS))
def test_float32_adapter_on_a_bfloat16_base_under_autocast(method):
    """add_adapter(dtype=float32) over bf16 weights (stable optimiser updates): under autocast the
    layer gives bf16 like its base, the gradients are float32, and the output is the float32 copy's."""
    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    trained = adapted(net, method, dtype=torch.float32)
    assert {p.dtype for p in trained} == {torch.float32}
    with torch.no_grad():
        x = torch.randn(6, 64, dtype=torch.bfloat16)
        reference = copy.deepcopy(net).float()(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


def _tiny_llama_bf16():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_trainer_trains_a_float32_adapter_over_a_bfloat16_base_with_autocast(tmp_path):
    from loralab.train.trainer import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(1, 64, (12,), generator=g).tolist()), "labels": ids}
            for _ in range(4)]  # four sequences to learn by heart
    model = _tiny_llama_bf16()
    ll.add_adapter(model, ll.AdapterSpec(r=4, alpha=32, targets="all-linear"), dtype=torch.float32)
    settings = dict(task_kind="causal-lm", lr=2e-2, batch_size=4, max_steps=40, progress=False, log_every=1,
                    schedule="constant")
    with pytest.raises(ValueError, match="keeps torch.float32 tensors over torch.bfloat16 base weights.*precision"):
        Trainer(model, data, None, TrainConfig(**settings))
    trainer = Trainer(model, data, None, TrainConfig(precision="bf16", **settings))
    trainer.train()
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < losses[0] - 0.1  # (ln 64 = 4.16 at the start)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ll.save_adapter(model, tmp_path)
    again = ll.load_adapter(_tiny_llama_bf16(), tmp_path, dtype=torch.float32)
    ids = torch.randint(1, 64, (2, 8), generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert {p.dtype for p in again.parameters() if p.requires_grad} == {torch.float32}
