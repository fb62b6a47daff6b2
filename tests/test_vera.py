"""VeRA (arXiv 2310.11454): ΔW = Λ_b B Λ_d A with frozen random A, B shared by all layers."""

import torch
from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from torch import nn

import loralab as ll

SPEC = dict(method="vera", r=3, alpha=3, targets=["layer"])


def reference(m, w):
    a = m.shared.vera_A[:, : w.shape[1]]
    b = m.shared.vera_B[: w.shape[0]]
    return torch.diag(m.lora_b) @ b @ torch.diag(m.lora_d) @ a


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
