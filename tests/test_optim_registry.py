"""Optimisers by name: the default AdamW's groups, suggestions for unknown names, one file per optimiser."""

import importlib
import pkgutil
import sys

import pytest
import torch
from torch import nn
from trainer_toy import adapted_toy, examples

import loralab.train.optim as optim_package
from loralab.registry import Registry
from loralab.train import TrainConfig, Trainer
from loralab.train.optim import OPTIMIZERS, get_optimizer, list_optimizers


def test_adamw_decays_trainable_matrices_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = get_optimizer("adamw")(model, TrainConfig(lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9)))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay == {id(model[2].weight): 0.1, id(model[2].bias): 0.0,
                     id(model[1].weight): 0.0, id(model[1].bias): 0.0}
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean: adamw"):
        get_optimizer("adamv")


def test_every_file_in_the_package_is_loaded():
    assert "adamw" in list_optimizers()
    for info in pkgutil.iter_modules(optim_package.__path__):
        assert info.name.startswith("_") or f"loralab.train.optim.{info.name}" in sys.modules


def test_a_new_file_registers_itself(tmp_path, monkeypatch):
    package = tmp_path / "my_optims"
    package.mkdir()
    (package / "__init__.py").write_text("from loralab.registry import Registry\n\n"
                                         "REG = Registry('optimizer', __name__)\n")
    (package / "sgd.py").write_text("from my_optims import REG\n\n\n@REG.register('sgd')\n"
                                    "def sgd(model, config):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry: Registry = importlib.import_module("my_optims").REG
        assert registry.names() == ["sgd"]
        with pytest.raises(ValueError, match="registered twice"):
            registry.register("sgd")(lambda model, config: None)
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "my_optims"]:
            del sys.modules[name]


def test_trainer_uses_the_optimizer_named_in_the_config(monkeypatch):
    def sgd(model, config):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr)

    monkeypatch.setitem(OPTIMIZERS._items, "plain-sgd", sgd)
    trainer = Trainer(adapted_toy(), examples(8), None, TrainConfig(optimizer="plain-sgd", progress=False))
    assert type(trainer.optimizer) is torch.optim.SGD
