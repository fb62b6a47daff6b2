"""RandLoRA (arXiv 2502.00987): ΔW = s·Σ_i B_i diag(λ_i) A diag(γ_i), full rank from frozen random bases
(one shared A; γ on the smaller side, so for in > out it is ΔWᵀ that has this form)."""

import json

import pytest
import torch
from method_harness import (
    Stack,
    attached,
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
from loralab.model import adapter_names, get_spec

SPEC = dict(method="randlora", r=3, alpha=6, targets=["layer"])


def reference(m, w):
    """Base b, rank k: column b·r + k of B's flattening pairs with row k·n + b of λ ⊙ A ⊙ γ's, as PEFT flattens."""
    small, large = min(w.shape), max(w.shape)
    r, n = m.randlora_lambda.shape
    a = m.shared.randlora_A[:, 0, :small]
    flat_b = m.shared.randlora_B[:large, :n].reshape(large, n * r)
    total = torch.zeros(large, small)
    for k in range(r):
        for b in range(n):
            column = flat_b[:, k * n + b]
            total = total + torch.outer(column, m.randlora_lambda[k, b] * a[k] * m.randlora_gamma[b])
    total = m.scale * total
    return total if w.shape[1] == small else total.T


def test_randlora(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: -(-min(i, o) // 3) * (3 + min(i, o)))
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)


def test_update_reaches_full_rank():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    assert torch.linalg.matrix_rank(method.delta_weight().detach()) == 10  # min(in=12, out=10), with r=3


# ---- PEFT's RandLoRA format, both ways ----------------------------------------------------------
X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
# (layer kind, spec fields): the settings that change the saved file, one at a time
CASES = [
    ("linear", {}),
    ("hf-conv1d", {}),
    ("linear", {"r": 5, "alpha": 7.5, "options": {"seed": 4}}),
    ("linear", {"rslora": True}),
    ("linear", {"options": {"save_projection": False}}),
    ("hf-conv1d", {"options": {"save_projection": False, "seed": 2}}),
    ("linear", {"options": {"sparse": True, "save_projection": False}}),
    ("linear", {"options": {"very_sparse": True, "save_projection": False}}),
    ("linear", {"r": 40}),  # r above every layer's size: one base each
    ("linear", {"bias": "lora_only", "dropout": 0.1}),
]


def peft_randlora_config(spec: dict, kind: str = "linear", init_weights: bool = False):
    from peft import RandLoraConfig

    options, r = spec.get("options", {}), spec.get("r", 4)
    alpha = spec.get("alpha", 16.0) * (r ** 0.5 if spec.get("rslora") else 1)  # the same s = alpha / r
    return RandLoraConfig(target_modules=["a", "b", "c"], r=r, randlora_alpha=alpha,
                          projection_prng_key=options.get("seed", 0),
                          save_projection=options.get("save_projection", True),
                          sparse=options.get("sparse", False), very_sparse=options.get("very_sparse", False),
                          randlora_dropout=spec.get("dropout", 0.0),
                          bias="randlora_only" if spec.get("bias") == "lora_only" else "none",
                          fan_in_fan_out=kind == "hf-conv1d", init_weights=init_weights)


def loralab_stack(kind: str, extra: dict) -> nn.Module:
    net = Stack(kind)
    ll.add_adapter(net, ll.AdapterSpec(**{"method": "randlora", "r": 4, "targets": ["a", "b", "c"], **extra}))
    randomise_trainables(net)
    return net.eval()


@pytest.mark.parametrize("kind, extra", CASES)
def test_peft_loads_loralab_randlora(tmp_path, kind, extra):
    check_peft_reads(tmp_path, loralab_stack(kind, extra), lambda: Stack(kind), X)


@pytest.mark.parametrize("kind, extra", CASES)
def test_loralab_loads_peft_randlora(tmp_path, kind, extra):
    net = check_reads_peft(tmp_path, peft_randlora_config(extra, kind), lambda: Stack(kind), X)
    assert get_spec(net, "default").dropout == extra.get("dropout", 0.0)


@pytest.mark.parametrize("options", [{}, {"sparse": True}, {"very_sparse": True}, {"save_projection": False}])
def test_file_has_peft_keys_and_fields(tmp_path, options):
    from peft import get_peft_model

    extra = {"r": 5, "alpha": 10.0, "bias": "lora_only", "dropout": 0.2, "options": {"seed": 2, **options}}
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(method="randlora", targets=["a", "b", "c"], **extra))
    check_same_file_as_peft(tmp_path, get_peft_model(Stack(), peft_randlora_config(extra, init_weights=True)), net,
                            ("peft_type", "r", "randlora_alpha", "randlora_dropout", "projection_prng_key",
                             "save_projection", "sparse", "very_sparse", "bias"))


def test_num_bases_is_kept_in_loralabs_own_field(tmp_path):
    from peft import PeftModel

    net = loralab_stack("linear", {"options": {"num_bases": 2}})
    ll.save_adapter(net, tmp_path)
    assert ll.read_config(tmp_path)["num_bases"] == 2
    loaded = ll.load_adapter(Stack(), tmp_path)
    torch.testing.assert_close(loaded(X), net(X), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT has n = ⌈min/r⌉ only, and says so
        PeftModel.from_pretrained(Stack(), tmp_path)


def test_earlier_loralab_layout_is_refused_clearly(tmp_path):
    """RandLoRA as loralab saved it before it used PEFT's format: n independent A_i per layer."""
    r, n = 4, 3
    tensors = {f"base_model.model.{p}.{k}": torch.randn(shape) for p, (i, o) in (("a", (16, 12)), ("b", (12, 20)))
               for k, shape in (("bases_B", (n, o, r)), ("bases_A", (n, r, i)), ("lora_lambda", (n, r)),
                                ("lora_gamma", (n, i)))}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("randlora", r=r, alpha=16.0, targets=["a", "b"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    net = Stack()
    with pytest.raises(ValueError, match="earlier layout.*one shared A"):
        ll.load_adapter(net, tmp_path)
    assert adapter_names(net) == []
