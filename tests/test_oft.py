"""OFT (arXiv 2306.07280): W' = W·R with R block-diagonal orthogonal from Cayley transforms."""

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

SPEC = dict(method="oft", r=3, alpha=3, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def rotation(m):
    """Block-diagonal R built here from the trained upper triangles: Q skew, R = (I+Q)(I−Q)⁻¹."""
    blocks = []
    for k in range(3):
        q = torch.zeros(4, 4)
        q[torch.triu_indices(4, 4, 1)[0], torch.triu_indices(4, 4, 1)[1]] = m.oft_Q[k]
        q = q - q.T
        blocks.append((torch.eye(4) + q) @ torch.linalg.inv(torch.eye(4) - q))
    return torch.block_diag(*blocks)


def test_oft(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: w @ rotation(m) - w, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 3 * 4 * 3 // 2, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=3e-2)


def test_rotation_is_orthogonal_and_keeps_neuron_angles():
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    r = torch.block_diag(*method.rotations().detach())
    torch.testing.assert_close(r @ r.T, torch.eye(12), atol=1e-5, rtol=0)
    w = net.layer.base_layer.weight.detach()
    merged = method.merged_weight(w).detach()
    torch.testing.assert_close(merged @ merged.T, w @ w.T, atol=1e-5, rtol=1e-5)
