"""DoRA (arXiv 2402.09353) against W' = m · (W + sBA) / ‖W + sBA‖_row written here."""

import torch
from method_harness import (
    attached,
    base_matrix,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

KINDS = ("linear", "hf-conv1d", "conv")
SPEC = dict(method="dora", r=3, alpha=6, targets=["layer"])


def dora_delta(method, w):
    combined = w + (6 / 3) * method.lora_B @ method.lora_A
    return method.magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True) - w


def test_forward_equals_paper_formula():
    check_forward(ll.AdapterSpec(**SPEC), dora_delta, kinds=KINDS)


def test_merge_unmerge_restores_weights():
    check_merge_roundtrip(ll.AdapterSpec(**SPEC), kinds=KINDS)


def test_param_count_adds_one_magnitude_per_row():
    check_param_count(ll.AdapterSpec(**SPEC), lambda i, o: 3 * (i + o) + o, kinds=KINDS)


def test_save_load_roundtrip(tmp_path):
    check_save_load(ll.AdapterSpec(**SPEC), tmp_path, kinds=KINDS)


def test_training_lowers_loss():
    check_training_lowers_loss(ll.AdapterSpec(**SPEC))


def test_magnitude_starts_at_row_norms_and_output_unchanged():
    net, method = attached(ll.AdapterSpec(**SPEC), "linear", randomize=False)
    torch.testing.assert_close(method.magnitude.detach(), base_matrix(net).norm(dim=1))


def test_fast_row_norms_equal_dense_norms():
    _, method = attached(ll.AdapterSpec(**SPEC), "linear")
    w = base_matrix(_)
    dense = (w + 2.0 * method.lora_B @ method.lora_A).norm(dim=1)
    torch.testing.assert_close(method.row_norms(), dense.detach(), atol=1e-5, rtol=1e-5)


def test_embedding_is_refused_with_reason():
    import pytest

    with pytest.raises(ValueError, match="does not support Embedding"):
        attached(ll.AdapterSpec(**SPEC), "embedding")
