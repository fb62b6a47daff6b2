"""Hydra (arXiv 2309.06922): ΔW = s·(B_p A_p + W B_s A_s), a parallel and a sequential branch."""

from method_harness import (
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)

import loralab as ll

SPEC = dict(method="hydra", r=3, alpha=6, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def test_hydra(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: 2.0 * (m.lora_B @ m.lora_A + w @ m.seq_B @ m.seq_A), kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 3 * (i + o) + 2 * 3 * i, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec)
