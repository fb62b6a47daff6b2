"""AdaLoRA (arXiv 2303.10512): the SVD-form ΔW = s·P·diag(λ⊙m)·Q, and its pruning schedule meets its budget."""

import json

import pytest
import torch
from method_harness import (
    Net,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from old_layout import old_loralab_config
from trainer_toy import examples

import loralab as ll
from loralab.model import methods_of
from loralab.train import TrainConfig, Trainer
from loralab.train.rank.adalora import budget_at

SPEC = dict(method="adalora", r=4, alpha=8, targets=["layer"])


def reference(method, w):
    return 2.0 * method.lora_P @ torch.diag(method.lora_E * method.rank_mask) @ method.lora_Q


def test_forward_equals_svd_form():
    check_forward(ll.AdapterSpec(**SPEC), reference)


def test_merge_save_count_train(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_merge_roundtrip(spec)
    check_save_load(spec, tmp_path)
    check_param_count(spec, lambda i, o: 4 * (i + o) + 4)
    check_training_lowers_loss(spec, lr=3e-2)


def test_orthogonality_gradient_matches_autograd():
    from method_harness import attached

    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    p = method.lora_P.detach().clone().requires_grad_(True)
    q = method.lora_Q.detach().clone().requires_grad_(True)
    eye = torch.eye(4)
    reg = (p.T @ p - eye).pow(2).sum() + (q @ q.T - eye).pow(2).sum()
    gp, gq = torch.autograd.grad(reg, (p, q))
    ours = method.orthogonality_grads()
    torch.testing.assert_close(ours[0], gp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1], gq, atol=1e-5, rtol=1e-4)


def test_budget_schedule_is_cubic():
    assert budget_at(0, 100, 40, 10, 10, 20) == 40
    assert budget_at(10, 100, 40, 10, 10, 20) == 40
    assert budget_at(45, 100, 40, 10, 10, 20) == round(10 + 30 * (1 - 35 / 70) ** 3)
    assert budget_at(85, 100, 40, 10, 10, 20) == 10


def toy_model(method_options=None):
    from trainer_toy import Toy

    model = Toy(dropout=0.0)
    ll.add_adapter(model, ll.AdapterSpec(method="adalora", r=4, alpha=8, targets=["hidden"],
                                         modules_to_save=["head"], options=method_options or {}))
    return model


def test_pruning_reaches_budget():
    model = toy_model()
    config = TrainConfig(lr=2e-2, batch_size=16, max_steps=40, progress=False, rank_schedule="adalora",
                         rank_options={"target_rank": 2, "warmup": 5, "final": 10, "interval": 5})
    Trainer(model, examples(64), None, config).train()
    methods = [m for m in model.modules() if getattr(m, "name", "") == "adalora"]
    assert sum(m.active_rank() for m in methods) == 2


def test_increlora_grows_to_budget():
    model = toy_model({"init_rank": 1})
    config = TrainConfig(lr=2e-2, batch_size=16, max_steps=30, progress=False, rank_schedule="increlora",
                         rank_options={"target_rank": 3, "interval": 5})
    methods = [m for m in model.modules() if getattr(m, "name", "") == "adalora"]
    assert sum(m.active_rank() for m in methods) == 1
    Trainer(model, examples(64), None, config).train()
    assert sum(m.active_rank() for m in methods) == 3


def test_schedule_refuses_other_methods_and_options():
    from trainer_toy import adapted_toy

    with pytest.raises(ValueError, match="needs adapters of method 'adalora'"):
        Trainer(adapted_toy(), examples(8), None, TrainConfig(rank_schedule="adalora", progress=False))
    with pytest.raises(ValueError, match="does not take option"):
        Trainer(toy_model(), examples(8), None, TrainConfig(rank_schedule="adalora", rank_options={"x": 1}))
    with pytest.raises(ValueError, match="unknown rank schedule"):
        Trainer(toy_model(), examples(8), None, TrainConfig(rank_schedule="adaloar"))


# ---- PEFT's AdaLoRA format, both ways ----------------------------------------------------------
PEFT_KINDS = ("linear", "hf-conv1d", "conv")  # what PEFT's AdaLoRA takes (not nn.Embedding)


def randomized(net, dtype=torch.float32, mask=None, **spec):
    """`net` with a random AdaLoRA named "a" (P, Q and λ all drawn), its mask set to `mask`."""
    ll.add_adapter(net.to(dtype), ll.AdapterSpec(**{**SPEC, **spec}), name="a")
    (_, method), = methods_of(net, "a")
    with torch.no_grad():
        for p in (method.lora_P, method.lora_Q, method.lora_E):
            p.normal_(0, 0.5)
        if mask is not None:
            method.rank_mask.copy_(torch.tensor(mask))
    return net


def peft_adalora(kind, prune, dtype=torch.float32, **options):
    """A PEFT AdaLoRA (init_r=4) on harness Net(kind) with random A, B, E; `prune`: PEFT's own allocator
    masks it down to target_r=2 on average (its final masking is at step total_step − tfinal = 3)."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(target_modules=["layer"], init_r=4, target_r=2, total_step=4, tfinal=1,
                           fan_in_fan_out=kind == "hf-conv1d", **{"lora_alpha": 8, **options})
    theirs = get_peft_model(Net(kind).to(dtype), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    x = Net(kind).sample().to(dtype)
    for step in range(4 if prune else 0):
        theirs(x).pow(2).sum().backward()
        theirs.base_model.update_and_allocate(step)
        theirs.zero_grad()
    return theirs.eval()


@pytest.mark.parametrize("kind", PEFT_KINDS)
@pytest.mark.parametrize("variant", [{}, {"mask": [1.0, 0.0, 1.0, 0.0]}, {"rslora": True, "alpha": 3.0}])
def test_peft_loads_loralab_adalora(tmp_path, kind, variant):
    from peft import PeftModel

    net = randomized(Net(kind), **variant)
    ll.save_adapter(net, tmp_path, name="a")
    x = net.sample()
    theirs = PeftModel.from_pretrained(Net(kind), tmp_path).eval()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", PEFT_KINDS)
@pytest.mark.parametrize("prune", [False, True])
def test_loralab_loads_peft_adalora(tmp_path, kind, prune):
    theirs = peft_adalora(kind, prune)
    theirs.save_pretrained(tmp_path)
    if prune:  # PEFT's file then holds only the kept triplets
        assert sum(map(sum, theirs.peft_config["default"].rank_pattern.values())) == 2
    net = ll.load_adapter(Net(kind), tmp_path)
    x = net.sample()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    (_, method), = methods_of(net, "default")
    assert method.active_rank() == (2 if prune else 4)


def test_scale_is_peft_lora_alpha_over_init_r_plus_its_epsilon(tmp_path):
    """PEFT scales by lora_alpha / (init_r + 1e-5): in float64 the outputs agree far below that epsilon's
    effect (2.5e-6 relative here), both ways."""
    from peft import PeftModel

    net = randomized(Net("linear"), torch.float64)
    ll.save_adapter(net, tmp_path / "ours", name="a")
    x = net.sample().double()
    theirs = PeftModel.from_pretrained(Net("linear").double(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-12, rtol=1e-10)
    peft_adalora("linear", prune=False, dtype=torch.float64).save_pretrained(tmp_path / "theirs")
    theirs = PeftModel.from_pretrained(Net("linear").double(), tmp_path / "theirs").eval()
    ours = ll.load_adapter(Net("linear").double(), tmp_path / "theirs")
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-10)


def test_zero_lora_alpha_reads_as_peft_scales_it_and_is_refused_once_pruned(tmp_path):
    """PEFT's lora_alpha <= 0 means "scale by the layer's rank": init_r unpruned, else each layer's own."""
    theirs = peft_adalora("linear", prune=False, lora_alpha=0)
    theirs.save_pretrained(tmp_path / "whole")
    net = ll.load_adapter(Net("linear"), tmp_path / "whole")
    x = net.sample()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    peft_adalora("linear", prune=True, lora_alpha=0).save_pretrained(tmp_path / "pruned")
    with pytest.raises(ValueError, match="lora_alpha=0 and a rank_pattern that prunes"):
        ll.load_adapter(Net("linear"), tmp_path / "pruned")


def test_file_with_more_triplets_than_init_r_is_refused(tmp_path):
    ll.save_adapter(randomized(Net("linear")), tmp_path, name="a")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_r": 3}))
    with pytest.raises(ValueError, match="layer.lora_E holds 4 triplets but the config's init_r is 3"):
        ll.load_adapter(Net("linear"), tmp_path)


def test_old_loralab_layout_still_loads(tmp_path):
    """The layout loralab wrote before it used PEFT's: lora_P, lora_Q, lora_E [r], rank_mask under LORALAB."""
    from safetensors.torch import save_file

    old = randomized(Net("linear"), mask=[1.0, 0.0, 1.0, 1.0])
    (_, method), = methods_of(old, "a")
    tensors = {k: getattr(method, k).detach().contiguous() for k in ("lora_P", "lora_Q", "lora_E", "rank_mask")}
    save_file({f"base_model.model.layer.{k}": t for k, t in tensors.items()}, tmp_path / "adapter_model.safetensors")
    config = old_loralab_config("adalora", r=4, alpha=8.0)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    net = ll.load_adapter(Net("linear"), tmp_path)
    x = net.sample()
    torch.testing.assert_close(net(x), old(x), atol=0, rtol=0)
    (_, loaded), = methods_of(net, "default")
    assert loaded.rank_mask.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_a_pruned_peft_adalora_config_reads_in_every_reader(tmp_path):
    """AdaLoRA's rank_pattern is its masks, read from the tensors, not per-layer ranks (serving, inspect)."""
    from loralab.checkpoint import read_config, spec_from_config
    from loralab.inspect_adapter import summarize

    peft_adalora("linear", prune=True).save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config["rank_pattern"]
    assert spec_from_config(config).method == "adalora"
    assert summarize(tmp_path).method == "adalora"


def test_masks_are_saved_as_peft_saves_them(tmp_path):
    """A pruned layer's file holds only its kept triplets and the config's rank_pattern every layer's mask (as
    PEFT's save_pretrained writes them); PEFT and loralab read it back with those ranks and the same outputs."""
    from method_harness import Stack
    from peft import PeftModel

    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(**{**SPEC, "targets": ["a", "b"]}))
    methods = dict(methods_of(net, "default"))
    with torch.no_grad():
        for method in methods.values():
            for p in (method.lora_P, method.lora_Q, method.lora_E):
                p.normal_(0, 0.5)
        methods["a"].rank_mask.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    ll.save_adapter(net, tmp_path)
    config = ll.read_config(tmp_path)
    assert config["rank_pattern"] == {"a.lora_E": [False, True, False, True], "b.lora_E": [True] * 4}
    tensors = ll.read_tensors(tmp_path)
    torch.testing.assert_close(tensors["a.lora_E"][:, 0], methods["a"].lora_E.detach()[[1, 3]])
    torch.testing.assert_close(tensors["a.lora_A"], methods["a"].lora_Q.detach()[[1, 3]])
    assert tensors["b.lora_E"].shape == (4, 1)
    x = torch.randn(3, 16)
    theirs = PeftModel.from_pretrained(Stack(), tmp_path).eval()
    assert theirs.base_model.model.a.lora_E["default"].shape == (2, 1)
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)
    again = ll.load_adapter(Stack(), tmp_path)
    torch.testing.assert_close(again(x), net(x), atol=1e-5, rtol=1e-5)
    assert [m.active_rank() for _, m in methods_of(again, "default")] == [2, 4]


def test_unpruned_adapter_writes_no_rank_pattern(tmp_path):
    net = randomized(Net("linear"))
    ll.save_adapter(net, tmp_path, name="a")
    assert ll.read_config(tmp_path)["rank_pattern"] is None
    assert ll.read_tensors(tmp_path)["layer.lora_E"].shape == (4, 1)


def test_a_peft_adalora_file_using_a_lora_feature_loralab_lacks_is_refused_by_name(tmp_path):
    """AdaLoRA's config is LoRA's plus its own fields: lora_bias there is refused as it is for LoRA."""
    peft_adalora("linear", prune=False).save_pretrained(tmp_path)
    config = ll.read_config(tmp_path)
    ll.load_adapter(Net("linear"), tmp_path)  # as saved, it loads
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(ValueError, match="uses lora_bias .*does not implement"):
        ll.load_adapter(Net("linear"), tmp_path)
