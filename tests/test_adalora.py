"""AdaLoRA (arXiv 2303.10512): the SVD-form ΔW = s·P·diag(λ⊙m)·Q, and its pruning schedule meets its budget."""

import pytest
import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from trainer_toy import examples

import loralab as ll
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
