"""SHiRA (arXiv 2406.13175): ΔW = M ⊙ S for a fixed sparse mask; the mask never moves."""

import json

import pytest
import torch
from method_harness import (
    Net,
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from safetensors.torch import save_file

import loralab as ll
from loralab.model import get_spec, methods_of

SPEC = dict(method="shira", r=1, targets=["layer"], options={"density": 0.1})


def reference(m, w):
    dense = torch.zeros(w.numel())
    dense[m.mask_index] = m.shira_values
    return dense.view(w.shape)


def test_shira(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: round(0.1 * i * o))
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=3e-2)


def test_mask_fixed_during_training_and_zero_outside():
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    mask = method.mask_index.clone()
    opt = torch.optim.Adam([method.shira_values], lr=0.1)
    for _ in range(3):
        net(net.sample()).pow(2).mean().backward()
        opt.step()
    assert torch.equal(method.mask_index, mask)
    outside = torch.ones(120, dtype=torch.bool)
    outside[mask] = False
    assert torch.count_nonzero(method.delta_weight().detach().flatten()[outside]) == 0


def test_weight_magnitude_mask_picks_largest_entries():
    net, method = attached(ll.AdapterSpec(**{**SPEC, "options": {"density": 0.1, "mask": "weight-magnitude"}}),
                           "linear")
    w = net.layer.base_layer.weight.detach().abs().flatten()
    assert set(method.mask_index.tolist()) == set(w.topk(12).indices.tolist())
    with pytest.raises(ValueError, match="density"):
        attached(ll.AdapterSpec(**{**SPEC, "options": {"density": 0}}), "linear")


def test_density_none_sizes_the_mask_as_peft_and_refuses_too_large_an_r():
    _, method = attached(ll.AdapterSpec(**{**SPEC, "r": 2, "options": {"density": None}}), "linear")
    assert method.shira_values.numel() == 2 * (12 + 10)
    with pytest.raises(ValueError, match=r"r·\(in \+ out\) = 132 entries, more than the layer's out·in = 120"):
        attached(ll.AdapterSpec(**{**SPEC, "r": 6, "options": {"density": None}}), "linear")


# ---- PEFT's SHiRA format, both ways ------------------------------------------------------------
# PEFT's SHiRA takes nn.Linear only (Net's "linear": 12 → 10, so r·(in + out) = 22·r).
def randomized(r: int, options: dict, bias: str = "none") -> Net:
    net = Net("linear")
    ll.add_adapter(net, ll.AdapterSpec(method="shira", r=r, targets=["layer"], options=options, bias=bias))
    (_, method), = methods_of(net, "default")
    with torch.no_grad():
        method.shira_values.normal_()
        if bias != "none":
            net.layer.kind.bias.normal_()
    return net


@pytest.mark.parametrize("r, options, bias", [
    (2, {"density": None, "seed": 5}, "none"),
    (1, {"density": None, "mask": "weight-magnitude"}, "none"),
    (1, {"density": 22 / 120, "seed": 1}, "none"),  # loralab's sizing, where it gives PEFT's 22 entries
    (1, {"density": None}, "lora_only"),
])
def test_peft_loads_loralab_shira(tmp_path, r, options, bias):
    from peft import PeftModel

    net = randomized(r, options, bias)
    ll.save_adapter(net, tmp_path)
    theirs = PeftModel.from_pretrained(Net("linear"), tmp_path).eval()
    x = Net("linear").sample()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)
    read = get_spec(ll.load_adapter(Net("linear"), tmp_path), "default").options  # and loralab reads it back
    assert read == {"density": 0.01, "mask": "random", "seed": 0, **options}


def test_peft_refuses_a_loralab_density_that_is_not_its_size(tmp_path):
    from peft import PeftModel

    ll.save_adapter(randomized(1, {"density": 0.1}), tmp_path)  # 12 entries, PEFT's r=1 makes 22
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(Net("linear"), tmp_path)


def every_fifth(base_layer: torch.nn.Module, r: int, **kwargs) -> torch.Tensor:
    """A mask of PEFT's custom kind (mask_fn): every fifth entry of W, r·(in + out) of them."""
    mask = torch.zeros_like(base_layer.weight)
    mask.view(-1)[: 5 * r * sum(base_layer.weight.shape): 5] = 1
    return mask


@pytest.mark.parametrize("r, seed, mask_fn", [(2, 5, None), (1, None, None), (1, 3, every_fifth)])
def test_loralab_loads_peft_shira(tmp_path, r, seed, mask_fn):
    from peft import ShiraConfig, get_peft_model

    config = ShiraConfig(target_modules=["layer"], r=r, random_seed=seed, init_weights=False,
                         mask_type="random" if mask_fn is None else "every-fifth")
    if mask_fn is not None:  # PEFT's custom mask types (it warns of the name)
        config.mask_fn = mask_fn
    theirs = get_peft_model(Net("linear"), config).eval()  # init_weights=False: random values
    theirs.save_pretrained(tmp_path)
    net = ll.load_adapter(Net("linear"), tmp_path)
    x = Net("linear").sample()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert get_spec(net, "default").options == {"density": None, "mask": "random", "seed": seed}


@pytest.mark.parametrize("r, seed", [(2, 5), (1, None)])
def test_random_mask_with_density_none_is_peft_s(r, seed):
    from peft import ShiraConfig, get_peft_model

    theirs = get_peft_model(Net("linear"), ShiraConfig(target_modules=["layer"], r=r, random_seed=seed))
    rows, cols = theirs.base_model.model.layer.shira_indices["default"].long()
    _, method = attached(ll.AdapterSpec(**{**SPEC, "r": r, "options": {"density": None, "seed": seed}}), "linear")
    assert torch.equal(method.mask_index, rows * 12 + cols)


def test_loralab_reads_its_old_shira_layout(tmp_path):
    options = {"density": 0.1, "mask": "weight-magnitude"}
    net = randomized(1, options)
    (_, method), = methods_of(net, "default")
    old = {"base_model.model.layer.shira_values": method.shira_values.detach().clone(),
           "base_model.model.layer.mask_index": method.mask_index.clone()}
    save_file(old, str(tmp_path / "adapter_model.safetensors"))
    config = {"peft_type": "LORALAB", "r": 1, "lora_alpha": 1.0, "lora_dropout": 0.0, "target_modules": ["layer"],
              "bias": "none", "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "loralab": {"format_version": 1, "method": "shira", "options": options, "init": "gaussian"}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))  # as loralab wrote SHiRA before PEFT's format
    x = Net("linear").sample()
    torch.testing.assert_close(ll.load_adapter(Net("linear"), tmp_path)(x), net(x))
