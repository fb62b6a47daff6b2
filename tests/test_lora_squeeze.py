"""LoRA-Squeeze: the squeezed adapter's ΔW is the best rank-k approximation of the original's
(checked against torch.linalg.svd of the dense ΔW), after training and during it."""

import copy

import pytest
import torch
from torch import nn
from trainer_toy import Toy, examples

import loralab as ll
from loralab.train import TrainConfig, Trainer
from loralab.train.rank.lora_squeeze import squeeze_adapter


def trained_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    ll.add_adapter(net, ll.AdapterSpec(r=6, alpha=12, targets=["0", "2"]))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return net


def test_post_hoc_squeeze_is_best_rank_k(tmp_path):
    net = trained_net()
    ll.save_adapter(net, tmp_path / "big")
    squeeze_adapter(tmp_path / "big", 2, tmp_path / "small")
    assert ll.read_config(tmp_path / "small")["r"] == 2
    small = copy.deepcopy(net)
    ll.remove_adapter(small, "default")
    ll.load_adapter(small, tmp_path / "small")
    for path in ("0", "2"):
        big = net.get_submodule(path).adapters["default"]
        dense = 2.0 * big.lora_B @ big.lora_A
        u, s, vh = torch.linalg.svd(dense.detach())
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(small.get_submodule(path).adapters["default"].delta_weight(), best,
                                   atol=1e-4, rtol=1e-4)


def test_squeeze_keeps_each_layers_own_scale_and_rank_limit(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    ll.add_adapter(net, ll.AdapterSpec(r=6, alpha=12, targets=["0", "2"], rank_pattern={"2": 4},
                                       alpha_pattern={"0": 3.0}))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ll.save_adapter(net, tmp_path / "big")
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        squeeze_adapter(tmp_path / "big", 5, tmp_path / "x")
    squeeze_adapter(tmp_path / "big", 2, tmp_path / "small")
    config = ll.read_config(tmp_path / "small")
    assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (2, {}, {})
    small = copy.deepcopy(net)
    ll.remove_adapter(small, "default")
    ll.load_adapter(small, tmp_path / "small")
    for path, scale in (("0", 3.0 / 6), ("2", 12.0 / 4)):
        big = net.get_submodule(path).adapters["default"]
        u, s, vh = torch.linalg.svd((scale * big.lora_B @ big.lora_A).detach())
        torch.testing.assert_close(small.get_submodule(path).adapters["default"].delta_weight(),
                                   u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-4, rtol=1e-4)


def test_squeeze_to_full_rank_changes_nothing(tmp_path):
    net = trained_net()
    x = torch.randn(3, 12)
    ll.save_adapter(net, tmp_path / "big")
    squeeze_adapter(tmp_path / "big", 6, tmp_path / "same")
    fresh = copy.deepcopy(net)
    ll.remove_adapter(fresh, "default")
    ll.load_adapter(fresh, tmp_path / "same")
    torch.testing.assert_close(fresh(x), net(x), atol=1e-5, rtol=1e-5)


def test_squeeze_during_training(tmp_path):
    model = Toy(dropout=0.0)
    ll.add_adapter(model, ll.AdapterSpec(r=8, alpha=16, targets=["hidden"], modules_to_save=["head"]))
    config = TrainConfig(lr=2e-2, batch_size=16, max_steps=20, progress=False, rank_schedule="lora-squeeze",
                         rank_options={"rank": 2, "at": 10})
    trainer = Trainer(model, examples(64), examples(32, seed=1), config)
    trainer.train()
    method = model.hidden.adapters["default"]
    assert method.lora_A.shape == (2, 16) and method.lora_B.shape == (16, 2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    ll.save_adapter(model, tmp_path / "a")
    again = Toy(dropout=0.0)
    ll.load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(again(ids), model(ids), atol=1e-6, rtol=1e-5)
