"""VB-LoRA (arXiv 2405.15179): every length-b piece of A and B is a top-k softmax mixture of one shared bank."""

import json

import pytest
import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from old_layout import old_loralab_config
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab as ll
from loralab.model import get_spec, methods_of

OPTS = {"bank_size": 6, "vector_length": 2, "top_k": 2}
SPEC = dict(method="vb-lora", r=2, alpha=4, targets=["layer"], options=OPTS)
KINDS = ("linear", "hf-conv1d")


def mix(row, bank):
    """One piece: the two largest logits, softmax over just those."""
    order = sorted(range(len(row)), key=lambda j: -row[j].item())[:2]
    weights = torch.softmax(row[order], dim=0)
    return weights[0] * bank[order[0]] + weights[1] * bank[order[1]]


def reference(m, w):
    bank, out = m.shared.vblora_vector_bank, w.shape[0]
    a = torch.stack([torch.cat([mix(piece, bank) for piece in row]) for row in m.vblora_logits_A])  # [r, in]
    b = torch.stack([torch.cat([mix(m.vblora_logits_B[j, i], bank) for j in range(out // 2)]) for i in range(2)]).T
    return 2.0 * b @ a


def test_vb_lora(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 6 * 2 + 6 * 2 * (i + o) // 2, kinds=KINDS)
    check_save_load(ll.AdapterSpec(**{**SPEC, "alpha": 2}), tmp_path, kinds=KINDS)  # s = 1: a reload is bit-exact
    check_training_lowers_loss(spec, lr=5e-2)


def test_auto_vector_length_is_the_largest_power_of_two_dividing_every_layer():
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384), torch.nn.Linear(384, 96))
    ll.add_adapter(model, ll.AdapterSpec(method="vb-lora", r=4, targets="all-linear"))
    method = model[0].adapters["default"]
    assert method.shared.vblora_vector_bank.shape == (256, 32)  # 96 = 3·32 caps it; 64 does not divide 96
    assert method.vblora_logits_A.shape == (4, 384 // 32, 256)
    assert method.shared.vblora_vector_bank.abs().max() <= 0.02  # the authors' bound: ΔW starts small


def test_a_vector_length_that_does_not_divide_a_layer_is_refused_by_size():
    model = torch.nn.Sequential(torch.nn.Linear(384, 96))
    with pytest.raises(ValueError, match=r"vector_length=64 .* does not divide \[96\]"):
        ll.add_adapter(model, ll.AdapterSpec(method="vb-lora", r=4, targets="all-linear",
                                             options={"vector_length": 64}))


# ---- PEFT's VBLORA format ------------------------------------------------------------------
class Two(nn.Module):
    """Two adapted layers (8 → 12 → 4) sharing one bank: GPT-2's Conv1D or nn.Linear."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = (Conv1D(12, 8), Conv1D(4, 12)) if conv1d else (nn.Linear(8, 12), nn.Linear(12, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def randomized(net: nn.Module, **spec) -> nn.Module:
    ll.add_adapter(net, ll.AdapterSpec(method="vb-lora", targets=["a", "b"], **spec))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_()
    return net


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("spec", [dict(r=2, alpha=6, options={"bank_size": 5, "top_k": 3}),  # s = 3, b "auto" = 4
                                  dict(r=3, alpha=3, bias="lora_only", options={"bank_size": 4, "vector_length": 2})])
def test_peft_loads_loralab_vb_lora(tmp_path, conv1d, spec):
    from peft import PeftModel

    net = randomized(Two(conv1d), **spec)
    ll.save_adapter(net, tmp_path)
    x = torch.randn(3, 5, 8)
    theirs = PeftModel.from_pretrained(Two(conv1d), tmp_path).eval()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)
    assert theirs.peft_config["default"].bias == ("vblora_only" if "bias" in spec else "none")


@pytest.mark.parametrize("conv1d, topk_only, bias", [(False, False, "none"), (True, False, "vblora_only"),
                                                     (False, True, "vblora_only"), (True, True, "none")])
def test_loralab_loads_peft_vb_lora(tmp_path, conv1d, topk_only, bias):
    from peft import VBLoRAConfig, get_peft_model

    config = VBLoRAConfig(target_modules=["a", "b"], r=2, num_vectors=5, vector_length=4, topk=3, bias=bias,
                          init_vector_bank_bound=1.0, init_logits_std=1.0, save_only_topk_weights=topk_only,
                          fan_in_fan_out=conv1d)
    theirs = get_peft_model(Two(conv1d), config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("bias") and bias != "none":  # vblora_only: the adapted layers' biases are saved
                p.normal_()
    theirs.save_pretrained(tmp_path)
    net = ll.load_adapter(Two(conv1d), tmp_path)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert get_spec(net, "default").bias == ("lora_only" if bias == "vblora_only" else "none")


def test_old_loralab_layout_still_loads(tmp_path):
    net = randomized(Two(), r=2, alpha=6, options={"bank_size": 5, "top_k": 3})
    old = {"base_model.model.loralab_shared.bank": net.a.adapters["default"].shared.vblora_vector_bank}
    for path, m in methods_of(net, "default"):  # the old rank-major logits: [r·in/b, h] and [r·out/b, h]
        old[f"base_model.model.{path}.logits_A"] = m.vblora_logits_A.reshape(-1, 5)
        old[f"base_model.model.{path}.logits_B"] = m.vblora_logits_B.transpose(0, 1).reshape(-1, 5)
    save_file({k: v.detach().contiguous() for k, v in old.items()}, tmp_path / "adapter_model.safetensors")
    config = old_loralab_config("vb-lora", r=2, alpha=6, targets=["a", "b"], options={"bank_size": 5, "top_k": 3})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ll.load_adapter(Two(), tmp_path)(x), net(x), atol=0, rtol=0)
