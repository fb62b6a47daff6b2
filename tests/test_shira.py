"""SHiRA (arXiv 2406.13175): ΔW = M ⊙ S for a fixed sparse mask; the mask never moves."""

import pytest
import torch
from method_harness import (
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

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
