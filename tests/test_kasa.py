"""KaSA (arXiv 2412.06071): ΔW = −(W's r minor SVD components) + s·ΔU diag(Δσ) ΔV; its files in PEFT's
KaSA LoRA variant, read by PEFT and read from PEFT (the reference: PEFT's own forward)."""

import json

import torch
from method_harness import (
    Stack,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_peft_reads,
    check_reads_peft,
    check_same_file_as_peft,
    check_save_load,
    check_training_lowers_loss,
    randomise_trainables,
)
from old_layout import old_loralab_config
from safetensors.torch import save_file
from svd_ref import svd

import loralab as ll
from loralab.model import get_spec, methods_of

SPEC = dict(method="kasa", r=2, alpha=4, targets=["layer"])


def reference(m, w):
    u, s, vh = svd(w)
    minor = u[:, -2:] @ (s[-2:, None] * vh[-2:])
    return 2.0 * (m.kasa_U * m.kasa_sigma) @ m.kasa_V - minor


def test_kasa(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 2 * (i + o) + 2)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
STACK = ["a", "b", "c"]


def peft_kasa_config():
    from peft import LoraConfig
    from peft.tuners.lora.config import KasaConfig

    return LoraConfig(r=2, lora_alpha=4, target_modules=STACK, kasa_config=KasaConfig())


def kasa_stack() -> Stack:
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(method="kasa", r=2, alpha=4, targets=STACK))
    randomise_trainables(net)
    return net


def test_peft_loads_loralab_kasa(tmp_path):
    check_peft_reads(tmp_path, kasa_stack(), Stack, X)


def test_loralab_loads_peft_kasa(tmp_path):
    net = check_reads_peft(tmp_path, peft_kasa_config(), Stack, X)
    assert get_spec(net, "default").method == "kasa"


def test_file_has_peft_keys_and_fields(tmp_path):
    from peft import get_peft_model

    check_same_file_as_peft(tmp_path, get_peft_model(Stack(), peft_kasa_config()), kasa_stack(),
                            ("peft_type", "r", "lora_alpha", "kasa_config", "use_dora"), exact=False)


def test_other_layer_kinds_are_saved_in_loralab_layout(tmp_path):
    net = Stack("hf-conv1d")  # PEFT's KaSA takes nn.Linear only
    ll.add_adapter(net, ll.AdapterSpec(method="kasa", r=2, alpha=4, targets=STACK))
    randomise_trainables(net)
    ll.save_adapter(net, tmp_path)
    config = ll.read_config(tmp_path)
    assert config["peft_type"] == "LORALAB" and "kasa_config" not in config
    torch.testing.assert_close(ll.load_adapter(Stack("hf-conv1d"), tmp_path)(X), net(X), atol=0, rtol=0)


def test_loralab_layout_still_loads(tmp_path):
    """A KaSA file loralab wrote before it used PEFT's format: its own keys and the filtered part, which is read."""
    net = kasa_stack()
    old = {}
    for path, m in methods_of(net, "default"):
        with torch.no_grad():
            m.minor.mul_(1.5)  # a kept filtered part that differs from a recomputed one is seen
        old |= {f"base_model.model.{path}.{k}": v for k, v in
                {"kasa_U": m.kasa_U, "kasa_V": m.kasa_V, "kasa_sigma": m.kasa_sigma, "minor": m.minor}.items()}
    save_file({k: v.detach().contiguous() for k, v in old.items()}, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("kasa", r=2, alpha=4.0, targets=STACK)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.testing.assert_close(ll.load_adapter(Stack(), tmp_path)(X), net(X), atol=0, rtol=0)
