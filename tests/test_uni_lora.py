"""Uni-LoRA (arXiv 2506.00799): LoRA parameters = init + P·θ with one θ for all layers, P isometric;
PEFT's UNILORA format (start="uniform") both ways."""

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
    check_save_load,
    check_training_lowers_loss,
    randomise_trainables,
)
from old_layout import old_loralab_config
from safetensors.torch import save_file
from torch import nn

import loralab as ll
from loralab.methods.uni_lora import balanced_index
from loralab.model import methods_of

SPEC = dict(method="uni-lora", r=2, alpha=4, targets=["layer"], options={"dim": 64})
KINDS = ("linear", "hf-conv1d")


def reference(m, w):
    p = torch.zeros(m.shared.index.numel(), 64)
    p[torch.arange(m.shared.index.numel()), m.shared.index] = m.shared.weight
    flat = p @ m.shared.theta
    a = m.init_A + flat[m.part_a].view(2, w.shape[1])
    b = flat[m.part_b].view(w.shape[0], 2)
    return m.scale * b @ a


@pytest.mark.parametrize("start", ["kaiming", "uniform"])
def test_uni_lora(tmp_path, start):
    # uniform: scale 1, so the reload (PEFT's format, which saves √s·θ) is exact
    spec = ll.AdapterSpec(**{**SPEC, "alpha": 2 if start == "uniform" else 4,
                             "options": {**SPEC["options"], "start": start}})
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 64, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=5e-2)


def test_projection_is_isometric_and_one_vector_serves_all_layers():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    ll.add_adapter(net, ll.AdapterSpec(method="uni-lora", r=2, targets=["0", "1"], options={"dim": 32}))
    shared = net[0].adapters["default"].shared
    assert shared is net[1].adapters["default"].shared
    assert ll.trainable_parameters(net).trainable == 32
    p = torch.zeros(shared.index.numel(), 32)
    p[torch.arange(shared.index.numel()), shared.index] = shared.weight
    used = p.abs().sum(0) > 0
    torch.testing.assert_close((p.T @ p)[used][:, used], torch.eye(int(used.sum())), atol=1e-6, rtol=0)


def test_uniform_start_has_no_offset_and_draws_theta():
    net = nn.Sequential(nn.Linear(8, 8))
    ll.add_adapter(net, ll.AdapterSpec(method="uni-lora", r=2, targets=["0"],
                                       options={"dim": 32, "start": "uniform", "bound": 0.1}))
    method = net[0].adapters["default"]
    assert not method.init_A.any()
    theta = method.shared.theta.detach()
    assert 0 < theta.abs().max() <= 0.1


def test_balanced_index_is_pefts():
    from peft.tuners.unilora.model import UniLoraModel

    for total, dim, seed in [(100, 7, 0), (96, 32, 3), (5, 8, 42)]:
        assert torch.equal(balanced_index(total, dim, seed), UniLoraModel.generate_index(total, dim, seed))
    counts = torch.bincount(balanced_index(100, 7, 0), minlength=7)
    assert counts.min() >= 14 and counts.max() <= 15


def test_unknown_start_is_refused():
    with pytest.raises(ValueError, match="start must be one of kaiming, uniform"):
        ll.add_adapter(nn.Sequential(nn.Linear(4, 4)), ll.AdapterSpec(method="uni-lora", targets=["0"],
                                                                      options={"start": "zero"}))


# ---- PEFT's UNILORA format, both ways ------------------------------------------------------------
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
PEFT_SPEC = dict(method="uni-lora", r=2, targets=["a", "b", "c"], options={"dim": 40, "seed": 5, "start": "uniform"})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [2.0, 6.0])
def test_peft_loads_loralab_uni_lora(tmp_path, kind, alpha):
    ours = Stack(kind)
    ll.add_adapter(ours, ll.AdapterSpec(**PEFT_SPEC, alpha=alpha))
    randomise_trainables(ours)
    check_peft_reads(tmp_path, ours, lambda: Stack(kind), X)
    config = ll.read_config(tmp_path)
    assert (config["peft_type"], config["theta_d_length"], config["proj_seed"]) == ("UNILORA", 40, 5)
    assert set(ll.read_tensors(tmp_path)) == {"base_model.unilora_theta_d"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("save_indices", [False, True])
def test_loralab_loads_peft_uni_lora(tmp_path, kind, save_indices):
    from peft import UniLoraConfig

    config = UniLoraConfig(target_modules=["a", "b", "c"], r=3, theta_d_length=50, proj_seed=7,
                           save_indices=save_indices, fan_in_fan_out=kind != "linear")
    net = check_reads_peft(tmp_path, config, lambda: Stack(kind), X)
    (_, method), *_ = methods_of(net, "default")
    assert method.options == {"dim": 50, "seed": 7, "start": "uniform", "bound": 0.02}


def test_peft_saved_indices_replace_the_generated_ones(tmp_path):
    """With save_indices PEFT's file carries the indices and scales: they are what loralab uses."""
    from peft import UniLoraConfig, get_peft_model

    theirs = get_peft_model(Stack(), UniLoraConfig(target_modules=["a", "b", "c"], r=2, theta_d_length=30,
                                                   save_indices=True))
    randomise_trainables(theirs)
    with torch.no_grad():
        layer = theirs.base_model.model.b
        layer.unilora_indices_A["default"].copy_(torch.randint(0, 30, layer.unilora_indices_A["default"].shape))
    theirs.eval().save_pretrained(tmp_path)
    net = ll.load_adapter(Stack(), tmp_path).eval()
    torch.testing.assert_close(net(X), theirs(X), atol=1e-5, rtol=1e-5)


def test_indices_pointing_outside_theta_are_refused(tmp_path):
    from peft import UniLoraConfig, get_peft_model

    theirs = get_peft_model(Stack(), UniLoraConfig(target_modules=["a", "b", "c"], r=2, theta_d_length=30,
                                                   save_indices=True))
    with torch.no_grad():
        theirs.base_model.model.a.unilora_indices_B["default"][0, 0] = 30
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"a.unilora_indices_B points outside θ \(length 30\)"):
        ll.load_adapter(Stack(), tmp_path)


def test_kaiming_start_is_saved_in_loralab_layout(tmp_path):
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(**{**PEFT_SPEC, "options": {"dim": 40}}))
    randomise_trainables(net)
    ll.save_adapter(net, tmp_path)
    assert ll.read_config(tmp_path)["peft_type"] == "LORALAB"
    torch.testing.assert_close(ll.load_adapter(Stack(), tmp_path)(X), net(X))


def test_old_loralab_layout_still_loads(tmp_path):
    """θ under loralab_shared.theta, as loralab wrote it before the PEFT format."""
    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(**{**PEFT_SPEC, "alpha": 2, "options": {"dim": 40, "seed": 3}}))
    randomise_trainables(net)
    theta = net.a.adapters["default"].shared.theta.detach().clone()
    save_file({"base_model.model.loralab_shared.theta": theta}, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("uni-lora", r=2, alpha=2, targets=["a", "b", "c"], options={"dim": 40, "seed": 3})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.testing.assert_close(ll.load_adapter(Stack(), tmp_path)(X), net(X))
