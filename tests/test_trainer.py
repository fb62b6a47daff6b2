"""The training loop: learning, schedule, accumulation, exact resume, Ctrl-C, logs, bad config."""

import json
import shutil

import pytest
import torch
from trainer_toy import Toy, adapted_toy, examples, trainable_state

from loralab.train import TrainConfig, Trainer
from loralab.train.trainer import lr_factor


def cfg(**kw):
    base = dict(lr=5e-2, batch_size=16, max_steps=40, progress=False, max_grad_norm=1.0, schedule="constant")
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_accuracy_rises():
    model = adapted_toy()
    trainer = Trainer(model, examples(256), examples(128, seed=1), cfg())
    before = trainer.evaluate()
    after = trainer.train()
    assert after["accuracy"] > max(0.75, before["accuracy"] + 0.2)
    assert after["loss"] < before["loss"]


def test_schedule_matches_formula():
    c = TrainConfig(max_steps=10, warmup_steps=2, schedule="linear")
    assert [lr_factor(s, c) for s in (0, 1, 2, 6, 10)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5, 0.0])
    c = TrainConfig(max_steps=10, warmup_steps=0, schedule="cosine")
    assert lr_factor(5, c) == pytest.approx(0.5)


def test_grad_accumulation_equals_one_big_batch():
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        model = adapted_toy(dropout=0.0)
        Trainer(model, examples(64), None, cfg(batch_size=batch, grad_accum=accum, max_steps=3)).train()
        results.append(trainable_state(model))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5)


def test_resume_is_exact(tmp_path):
    full = adapted_toy()
    Trainer(full, examples(64), None, cfg(max_steps=6, save_every=3, keep_last=5, out_dir=str(tmp_path / "a"))).train()
    resumed = adapted_toy()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    trainer = Trainer(resumed, examples(64), None, cfg(max_steps=6, out_dir=str(tmp_path / "b")))
    trainer.train(resume_from="latest")
    for name, value in trainable_state(full).items():
        torch.testing.assert_close(trainable_state(resumed)[name], value, atol=0, rtol=0)


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_a_resumable_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    model = adapted_toy()
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, examples(64), None, cfg(max_steps=6, out_dir=out), callbacks=[StopAt(4)]).train()
    assert (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no half-written folder
    again = adapted_toy()
    Trainer(again, examples(64), None, cfg(max_steps=6, out_dir=out)).train(resume_from="latest")
    straight = adapted_toy()
    Trainer(straight, examples(64), None, cfg(max_steps=6)).train()
    for name, value in trainable_state(straight).items():
        torch.testing.assert_close(trainable_state(again)[name], value, atol=0, rtol=0)


def test_jsonl_log(tmp_path):
    model = adapted_toy()
    Trainer(model, examples(64), examples(32), cfg(max_steps=4, log_every=2, eval_every=2,
                                                   out_dir=str(tmp_path))).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert {"lr", "grad_norm", "examples_per_s", "elapsed_s"} <= set(steps[0])
    assert any("eval_accuracy" in r for r in records)


@pytest.mark.parametrize("kw, message", [({"lr": 0}, "lr"), ({"schedule": "step"}, "schedule must be one of"),
                                         ({"max_steps": 0}, "max_steps"), ({"grad_accum": 0}, "grad_accum")])
def test_bad_config_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        Trainer(adapted_toy(), examples(8), None, cfg(**kw))


def test_no_trainable_parameters_refused():
    model = Toy()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, examples(8), None, cfg())


def test_unknown_optimizer_lists_known():
    with pytest.raises(ValueError, match="adamw"):
        Trainer(adapted_toy(), examples(8), None, cfg(optimizer="adamz"))
