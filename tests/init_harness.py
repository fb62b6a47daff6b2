"""Shared checks for initialisers that move s·B₀A₀ out of the base weight (PiSSA, MiLoRA, OLoRA, …)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import loralab as ll
from loralab.model import methods_of


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))


def init_model(init: str, r: int = 3, rslora: bool = False) -> tuple[nn.Module, nn.Module, list]:
    original = model()
    m = copy.deepcopy(original)
    ll.add_adapter(m, ll.AdapterSpec(r=r, alpha=2 * r, targets=["0", "2"], init=init, rslora=rslora))
    return original, m, list(methods_of(m, "default"))


def check_output_unchanged_and_residual(init: str) -> None:
    original, m, methods = init_model(init)
    x = torch.randn(4, 12)
    torch.testing.assert_close(m(x), original(x), atol=5e-5, rtol=1e-4)  # float32 round-off of W_res + BA
    for path, method in methods:
        w = original.get_submodule(path).weight
        w_res = m.get_submodule(path).base_layer.weight
        torch.testing.assert_close(w_res + 2.0 * method.lora_B @ method.lora_A, w, atol=1e-5, rtol=1e-5)


def check_saved_adapter_applies_to_original_base(init: str, tmp_path, rslora: bool = False) -> None:
    original, m, methods = init_model(init, rslora=rslora)
    with torch.no_grad():  # pretend training moved the factors (drawn in index order, whatever the layout)
        for _, method in methods:
            method.lora_A.add_(0.1 * torch.randn(method.lora_A.shape))
            method.lora_B.add_(0.1 * torch.randn(method.lora_B.shape))
    x = torch.randn(4, 12)
    ll.save_adapter(m, tmp_path)
    fresh = copy.deepcopy(original)
    ll.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), m(x), atol=1e-5, rtol=1e-5)
    assert ll.read_config(tmp_path)["r"] == 6


def singular(path: str, original: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(original.get_submodule(path).weight.detach(), full_matrices=False)
