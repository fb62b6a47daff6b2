"""DyLoRA (arXiv 2210.07558): ΔW_b = (alpha/b)·B[:, :b]·A[:b]; after training every truncation works."""

import pytest
import torch
from method_harness import check_forward, check_param_count, check_save_load
from trainer_toy import Toy, examples

import loralab as ll
from loralab.train import TrainConfig, Trainer
from loralab.train.rank.dylora import set_rank

SPEC = dict(method="dylora", r=4, alpha=8, targets=["layer"])


def test_full_rank_forward_and_files(tmp_path):
    check_forward(ll.AdapterSpec(**SPEC), lambda m, w: 2.0 * m.lora_B @ m.lora_A)
    check_param_count(ll.AdapterSpec(**SPEC), lambda i, o: 4 * (i + o))
    check_save_load(ll.AdapterSpec(**SPEC), tmp_path)


@pytest.mark.parametrize("b", [1, 2, 3])
def test_truncated_forward(b):
    from method_harness import attached, base_matrix, dense_forward

    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    set_rank(net, b)
    x = net.sample()
    delta = (8 / b) * method.lora_B[:, :b] @ method.lora_A[:b]
    torch.testing.assert_close(net(x), dense_forward(net, x, base_matrix(net) + delta), atol=1e-5, rtol=1e-4)


def test_every_truncation_usable_after_training():
    model = Toy(dropout=0.0)
    ll.add_adapter(model, ll.AdapterSpec(method="dylora", r=4, alpha=8, targets=["hidden"], modules_to_save=["head"]))
    trainer = Trainer(model, examples(128), examples(64, seed=1),
                      TrainConfig(lr=3e-2, batch_size=16, max_steps=60, progress=False, rank_schedule="dylora"))
    before = {}
    for b in range(1, 5):
        set_rank(model, b)
        before[b] = trainer.evaluate()["loss"]
    set_rank(model, 4)
    trainer.train()
    for b in range(1, 5):
        set_rank(model, b)
        assert trainer.evaluate()["loss"] < before[b] - 0.1, b
    with pytest.raises(ValueError, match="rank must be in"):
        set_rank(model, 5)
