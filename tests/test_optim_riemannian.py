"""Riemannian preconditioned LoRA (arXiv 2402.02347): grads scaled by (BᵀB)⁻¹ and (AAᵀ)⁻¹."""

import torch
from optim_toy import loss_of, run, toy

from loralab.train import TrainConfig
from loralab.train.optim import get_optimizer


def test_preconditioned_gradients_match_formula():
    model, method, x, target = toy()
    opt = get_optimizer("riemannian")(model, TrainConfig(lr=1e-2, optimizer_options={"damping": 0.0}))
    loss_of(model, x, target).backward()
    a, b = method.lora_A.detach(), method.lora_B.detach()
    ga, gb = method.lora_A.grad.clone(), method.lora_B.grad.clone()
    for f in opt.factors:
        opt.transform(f, 0)
    torch.testing.assert_close(method.lora_A.grad, torch.linalg.solve(b.T @ b, ga), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(method.lora_B.grad, gb @ torch.linalg.inv(a @ a.T), atol=1e-4, rtol=1e-4)


def test_lowers_loss():
    losses, _, _ = run("riemannian", lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]
