"""LoRA-FA (arXiv 2308.03303): A stays exactly at its initial value, B learns."""

import torch
from optim_toy import run, toy


def test_a_frozen_b_trained():
    _, before, _, _ = toy()
    a0, b0 = before.lora_A.detach().clone(), before.lora_B.detach().clone()
    losses, method, _ = run("lora-fa")
    torch.testing.assert_close(method.lora_A, a0, atol=0, rtol=0)
    assert not torch.allclose(method.lora_B, b0)
    assert losses[-1] < 0.8 * losses[0]
