"""(IA)³ (arXiv 2205.05638): y = l ⊙ (W x) + b, or W (l ⊙ x) + b for feed-forward layers."""

import pytest
import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

KINDS = ("linear", "hf-conv1d")


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3(tmp_path, feedforward):
    spec = ll.AdapterSpec(method="ia3", r=1, targets=["layer"], options={"feedforward": feedforward})
    if feedforward:
        check_forward(spec, lambda m, w: w * m.ia3_l - w, kinds=KINDS)
    else:
        check_forward(spec, lambda m, w: m.ia3_l[:, None] * w - w, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, (lambda i, o: i) if feedforward else (lambda i, o: o), kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)


def test_bias_not_scaled():
    from method_harness import attached

    net, method = attached(ll.AdapterSpec(method="ia3", r=1, targets=["layer"]), "linear")
    x = torch.zeros(1, 12)
    torch.testing.assert_close(net(x), net.layer.base_layer.bias[None])
