"""MoS (arXiv 2410.00938): A's rows and B's columns concatenate private shards and shards picked from shared pools."""

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

OPTS = {"pool_size": 16, "shard_length": 2, "private": 1}
SPEC = dict(method="mos", r=2, alpha=4, targets=["layer"], options=OPTS)
KINDS = ("linear", "hf-conv1d")


def reference(m, w):
    rows_a = [torch.cat([m.private_A[i, 0], *[m.shared.pool_A[k] for k in m.index_A[i]]]) for i in range(2)]
    rows_b = [torch.cat([m.private_B[i, 0], *[m.shared.pool_B[k] for k in m.index_B[i]]]) for i in range(2)]
    return 2.0 * torch.stack(rows_b, dim=1) @ torch.stack(rows_a)


def test_mos(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 2 * 16 * 2 + 2 * 1 * 2 * 2, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=5e-2)


def test_pools_shared_by_layers():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    ll.add_adapter(net, ll.AdapterSpec(method="mos", r=2, targets=["0", "1"], options=OPTS))
    assert net[0].adapters["default"].shared is net[1].adapters["default"].shared
    assert ll.trainable_parameters(net).trainable == 2 * 16 * 2 + 2 * (2 * 1 * 2 * 2)
