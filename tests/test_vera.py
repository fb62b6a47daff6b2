"""VeRA (arXiv 2310.11454): ΔW = Λ_b B Λ_d A with frozen random A, B shared by all layers."""

import json

import pytest
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
from torch import nn

import loralab as ll
from loralab.model import get_spec, methods_of

SPEC = dict(method="vera", r=3, alpha=3, targets=["layer"])


def reference(m, w):
    a = m.shared.vera_A[:, : w.shape[1]]
    b = m.shared.vera_B[: w.shape[0]]
    return torch.diag(m.vera_lambda_b) @ b @ torch.diag(m.vera_lambda_d) @ a


def test_vera(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: o + 3)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=5e-2)


def test_random_bases_shared_and_frozen():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    ll.add_adapter(net, ll.AdapterSpec(method="vera", r=2, targets=["0", "1"]))
    a0, a1 = net[0].adapters["default"], net[1].adapters["default"]
    assert a0.shared is a1.shared and not a0.shared.vera_A.requires_grad
    torch.testing.assert_close(a0.bases()[1][:6], a1.bases()[1])  # one pair, sliced per shape


# ---- PEFT's VeRA format, both ways -------------------------------------------------------------
X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
# (layer kind, spec fields): the options that change the saved file, one at a time
CASES = [
    ("linear", {}),
    ("hf-conv1d", {}),
    ("linear", {"options": {"seed": 7, "d_init": 0.5}}),
    ("linear", {"options": {"save_projection": False}}),
    ("hf-conv1d", {"options": {"save_projection": False, "seed": 3}}),
    ("linear", {"r": 24}),  # r above every layer's size, as PEFT allows (its default is 256)
    ("linear", {"bias": "lora_only", "dropout": 0.1}),
]


def peft_vera_config(spec: dict, kind: str = "linear", init_weights: bool = False):
    from peft import VeraConfig

    options = spec.get("options", {})
    return VeraConfig(target_modules=["a", "b", "c"], r=spec.get("r", 4), projection_prng_key=options.get("seed", 0),
                      save_projection=options.get("save_projection", True), d_initial=options.get("d_init", 0.1),
                      vera_dropout=spec.get("dropout", 0.0),
                      bias="vera_only" if spec.get("bias") == "lora_only" else "none",
                      fan_in_fan_out=kind == "hf-conv1d", init_weights=init_weights)


@pytest.mark.parametrize("kind, extra", CASES)
def test_peft_loads_loralab_vera(tmp_path, kind, extra):
    net = Stack(kind)
    ll.add_adapter(net, ll.AdapterSpec(**{"method": "vera", "r": 4, "targets": ["a", "b", "c"], **extra}))
    randomise_trainables(net)
    check_peft_reads(tmp_path, net, lambda: Stack(kind), X)


@pytest.mark.parametrize("kind, extra", CASES)
def test_loralab_loads_peft_vera(tmp_path, kind, extra):
    net = check_reads_peft(tmp_path, peft_vera_config(extra, kind), lambda: Stack(kind), X)
    assert get_spec(net, "default").dropout == extra.get("dropout", 0.0)


def test_file_has_peft_keys_and_fields(tmp_path):
    from peft import get_peft_model

    extra = {"r": 5, "bias": "lora_only", "dropout": 0.2, "options": {"seed": 2, "d_init": 0.3}}
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(method="vera", targets=["a", "b", "c"], **extra))
    check_same_file_as_peft(tmp_path, get_peft_model(Stack(), peft_vera_config(extra, init_weights=True)), net,
                            ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "vera_dropout",
                             "bias"))


def test_loralab_layout_still_loads(tmp_path):
    """A VeRA file loralab wrote before it used PEFT's format: its own keys, "peft_type": "LORALAB"."""
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(method="vera", r=4, targets=["a", "b", "c"], options={"seed": 1}))
    randomise_trainables(net)
    methods = dict(methods_of(net, "default"))
    old = {f"base_model.model.loralab_shared.{k}": v for k, v in methods["a"].shared.state_dict().items()}
    for path, m in methods.items():
        old |= {f"base_model.model.{path}.lora_b": m.vera_lambda_b, f"base_model.model.{path}.lora_d": m.vera_lambda_d}
    save_file({k: v.detach().contiguous() for k, v in old.items()}, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("vera", r=4, alpha=16.0, targets=["a", "b", "c"], options={"seed": 1})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = ll.load_adapter(Stack(), tmp_path)
    torch.testing.assert_close(loaded(X), net(X), atol=0, rtol=0)
