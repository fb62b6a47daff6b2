"""Mixed precision in the trainer: bf16/fp16 autocast over float32 weights, fp16 loss scaling, resume."""

import shutil

import pytest
import torch
from torch import nn
from trainer_toy import adapted_toy, examples, trainable_state

from loralab.train import TrainConfig, Trainer


def cfg(**kw):
    base = dict(lr=5e-2, batch_size=16, max_steps=40, progress=False, max_grad_norm=None, schedule="constant")
    return TrainConfig(**{**base, **kw})


class GradsBeforeStep:
    """Keeps the gradients the optimiser is about to apply, at the first step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_step(self, trainer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def linear_output_dtypes(model: nn.Module) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    return seen


def test_bf16_runs_the_products_in_bfloat16_over_float32_weights_and_learns():
    model = adapted_toy()
    seen = linear_output_dtypes(model)
    trainer = Trainer(model, examples(256), examples(128, seed=1), cfg(precision="bf16"))
    before = trainer.evaluate()
    after = trainer.train()
    assert seen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert after["accuracy"] > max(0.75, before["accuracy"] + 0.2)


def test_bf16_first_gradients_match_float32_to_bf16_rounding():
    grads = {}
    for precision in ("fp32", "bf16"):
        hook = GradsBeforeStep()
        Trainer(adapted_toy(dropout=0.0), examples(64), None, cfg(precision=precision, max_steps=1),
                callbacks=[hook]).train()
        grads[precision] = hook.grads
    for name, g in grads["fp32"].items():
        if not g.any():  # lora_A: B starts at zero
            assert not grads["bf16"][name].any()
            continue
        err = (grads["bf16"][name] - g).norm() / g.norm()
        assert 0 < err < 3e-2, (name, err)  # not zero: autocast really ran in bf16


def test_fp16_gradients_reach_the_optimiser_unscaled():
    grads = {}
    for precision in ("fp32", "fp16"):
        hook = GradsBeforeStep()
        trainer = Trainer(adapted_toy(dropout=0.0), examples(64), None, cfg(precision=precision, max_steps=1),
                          callbacks=[hook])
        trainer.train()
        grads[precision] = hook.grads
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1
    for name, g in grads["fp32"].items():
        torch.testing.assert_close(grads["fp16"][name], g, rtol=2e-2, atol=1e-4 * g.abs().max().item())


def test_fp16_resume_is_exact_with_the_loss_scale(tmp_path):
    full = adapted_toy()
    Trainer(full, examples(64), None, cfg(precision="fp16", max_steps=6, save_every=3, keep_last=5,
                                          out_dir=str(tmp_path / "a"))).train()
    state = torch.load(tmp_path / "a" / "checkpoint-3" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] > 1
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed = adapted_toy()
    trainer = Trainer(resumed, examples(64), None, cfg(precision="fp16", max_steps=6, out_dir=str(tmp_path / "b")))
    trainer.train(resume_from="latest")
    for name, value in trainable_state(full).items():
        torch.testing.assert_close(trainable_state(resumed)[name], value, atol=0, rtol=0)


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        Trainer(adapted_toy(), examples(8), None, cfg(precision="int8"))
