"""LoRA-FA (arXiv 2308.03303): A stays exactly at its initial value, B learns."""

import pytest
import torch
from optim_toy import run, toy
from torch import nn

import loralab as ll
from loralab.model import methods_of
from loralab.train import TrainConfig
from loralab.train.optim import get_optimizer


def test_a_frozen_b_trained():
    _, before, _, _ = toy()
    a0, b0 = before.lora_A.detach().clone(), before.lora_B.detach().clone()
    losses, method, _ = run("lora-fa")
    torch.testing.assert_close(method.lora_A, a0, atol=0, rtol=0)
    assert not torch.allclose(method.lora_B, b0)
    assert losses[-1] < 0.8 * losses[0]


def test_refuses_an_adapter_whose_b_is_frozen():
    model = nn.Sequential(nn.Linear(12, 10))
    ll.add_adapter(model, ll.AdapterSpec(r=3, init="mica", targets=["0"]))
    with pytest.raises(ValueError, match="1 of the 1 adapted layers have B frozen"):
        get_optimizer("lora-fa")(model, TrainConfig(optimizer="lora-fa"))
    assert next(m for _, m in methods_of(model, "default")).lora_A.requires_grad  # left as it was
