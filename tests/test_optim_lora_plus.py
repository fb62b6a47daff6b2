"""LoRA+ (arXiv 2402.12354): B's learning rate is ratio × A's."""

from optim_toy import run, toy

from loralab.train import TrainConfig
from loralab.train.optim import get_optimizer


def test_b_gets_ratio_times_the_rate():
    model, method, _, _ = toy()
    opt = get_optimizer("lora+")(model, TrainConfig(lr=1e-3, optimizer_options={"ratio": 8}))
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(method.lora_B)] == 8e-3 and rate[id(method.lora_A)] == 1e-3


def test_lowers_loss():
    losses, _, _ = run("lora+", lr=1e-3)
    assert losses[-1] < 0.8 * losses[0]
