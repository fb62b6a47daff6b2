"""SoRA (arXiv 2311.11696): ΔW = s·B·diag(g)·A; the proximal step zeroes gates exactly."""

import torch
from method_harness import check_forward, check_param_count, check_save_load, check_training_lowers_loss
from trainer_toy import Toy, examples

import loralab as ll
from loralab.train import TrainConfig, Trainer

SPEC = dict(method="sora", r=4, alpha=8, targets=["layer"])


def test_gated_forward_and_files(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: 2.0 * m.lora_B @ torch.diag(m.lora_gate) @ m.lora_A)
    check_param_count(spec, lambda i, o: 4 * (i + o) + 4)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec)


def test_proximal_step_sparsifies_gates():
    model = Toy(dropout=0.0)
    ll.add_adapter(model, ll.AdapterSpec(method="sora", r=4, alpha=8, targets=["hidden"], modules_to_save=["head"]))
    config = TrainConfig(lr=1e-2, batch_size=16, max_steps=30, progress=False, schedule="constant",
                         rank_schedule="sora", rank_options={"sparsity": 5.0})
    Trainer(model, examples(64), None, config).train()
    gate = model.hidden.adapters["default"].lora_gate
    assert (gate == 0).sum() >= 1  # exact zeros, not just small values
    assert model.hidden.adapters["default"].active_rank() == int((gate != 0).sum())
