"""AltLoRA (arXiv 2505.12455): B and A move in turn, never together."""

import torch
from optim_toy import loss_of, toy

from loralab.train import TrainConfig
from loralab.train.optim import get_optimizer


def test_factors_alternate_and_loss_falls():
    model, method, x, target = toy()
    opt = get_optimizer("altlora")(model, TrainConfig(lr=3e-2))
    first = loss_of(model, x, target).item()
    for step in range(24):
        a0, b0 = method.lora_A.detach().clone(), method.lora_B.detach().clone()
        loss = loss_of(model, x, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved_a = not torch.equal(method.lora_A, a0)
        moved_b = not torch.equal(method.lora_B, b0)
        assert (moved_a, moved_b) == ((False, True) if step % 2 == 0 else (True, False)), step
    assert loss_of(model, x, target).item() < 0.8 * first
