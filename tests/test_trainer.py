"""The training loop: learning, schedule, accumulation, exact resume, Ctrl-C, logs, losses, bad config."""

import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_toy import Toy, adapted_toy, examples, trainable_state

from loralab.train import TrainConfig, Trainer
from loralab.train.optim import get_optimizer
from loralab.train.trainer import compute_loss, lr_factor


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


def assert_resumes_exactly(out, **kw):
    """Resuming `out`'s newest checkpoint reaches the weights of an uninterrupted run, bit for bit."""
    again = adapted_toy()
    Trainer(again, examples(64), None, cfg(out_dir=out, **kw)).train(resume_from="latest")
    straight = adapted_toy()
    Trainer(straight, examples(64), None, cfg(**kw)).train()
    for name, value in trainable_state(straight).items():
        torch.testing.assert_close(trainable_state(again)[name], value, atol=0, rtol=0)


def test_ctrl_c_mid_step_saves_the_last_completed_step(tmp_path):
    out, kw = str(tmp_path / "run"), dict(max_steps=6, batch_size=8, grad_accum=2)
    model = adapted_toy()
    forwards = []

    def interrupt_in_step_4(module, args):  # the second micro-batch of step 4: data and dropout RNG moved on
        forwards.append(1)
        if len(forwards) == 8:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(interrupt_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, examples(64), None, cfg(out_dir=out, **kw)).train()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint-3"]
    assert_resumes_exactly(out, **kw)


def test_sigint_during_the_update_waits_for_the_step_to_finish(tmp_path):
    out, kw = str(tmp_path / "run"), dict(max_steps=6)
    updates = []

    def sigint_after_third_update(model, config):
        optimizer = get_optimizer("adamw")(model, config)

        def hook(opt, args, kwargs):  # weights already moved, step counter not yet
            updates.append(1)
            if len(updates) == 3:
                os.kill(os.getpid(), signal.SIGINT)

        optimizer.register_step_post_hook(hook)
        return optimizer

    with pytest.raises(KeyboardInterrupt):
        Trainer(adapted_toy(), examples(64), None, cfg(out_dir=out, **kw),
                optimizer_factory=sigint_after_third_update).train()
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    assert_resumes_exactly(out, **kw)


def test_jsonl_log(tmp_path):
    model = adapted_toy()
    Trainer(model, examples(64), examples(32), cfg(max_steps=4, log_every=2, eval_every=2,
                                                   out_dir=str(tmp_path))).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert {"lr", "grad_norm", "examples_per_s", "elapsed_s"} <= set(steps[0])
    assert any("eval_accuracy" in r for r in records)


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    config = cfg(max_steps=6, warmup_steps=2, schedule="linear", log_every=1, out_dir=str(tmp_path))
    Trainer(adapted_toy(), examples(64), None, config).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([5e-2 * lr_factor(s, config) for s in range(6)])


def test_max_eval_batches_caps_evaluation():
    seen = []

    def counting_collate(items):
        seen.append(len(items))
        return {"input_ids": torch.tensor([e["input_ids"] for e in items]),
                "labels": torch.tensor([e["labels"] for e in items])}

    trainer = Trainer(adapted_toy(), examples(8), examples(40), cfg(eval_batch_size=8, max_eval_batches=2),
                      collate_fn=counting_collate)
    trainer.evaluate()
    assert seen == [8, 8]


class TinyLM(nn.Module):
    def __init__(self, hf_style: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head, self.hf_style = nn.Embedding(10, 8), nn.Linear(8, 10), hf_style

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids))
        return SimpleNamespace(logits=logits, loss=torch.tensor(7.0)) if self.hf_style else logits


def test_causal_lm_loss_is_shifted_and_skips_ignored_tokens():
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[-100, 2, 3, -100]])}
    loss, logits = compute_loss(TinyLM(), batch, "causal-lm")
    expected = F.cross_entropy(logits[0, :2], torch.tensor([2, 3]))  # position t predicts label t+1
    torch.testing.assert_close(loss, expected)
    assert float(compute_loss(TinyLM(hf_style=True), batch, "causal-lm")[0]) == 7.0  # the model's own loss wins


def test_causal_lm_training_reports_perplexity():
    data = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}] * 16
    model = TinyLM()
    model.embed.requires_grad_(False)
    trainer = Trainer(model, data, data, cfg(task_kind="causal-lm", batch_size=4, max_steps=20))
    before = trainer.evaluate()
    after = trainer.train()
    assert after["loss"] < before["loss"] - 0.5
    assert after["perplexity"] == pytest.approx(torch.tensor(after["loss"]).exp().item(), rel=1e-6)


@pytest.mark.parametrize("kw, message", [({"lr": 0}, "lr"), ({"schedule": "step"}, "linear, cosine, constant"),
                                         ({"max_steps": 0}, "max_steps"), ({"grad_accum": 0}, "grad_accum"),
                                         ({"batch_size": 0}, "batch_size"), ({"log_every": 0}, "log_every")])
def test_bad_config_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        Trainer(adapted_toy(), examples(8), None, cfg(**kw))


def test_empty_training_data_refused():
    with pytest.raises(ValueError, match="empty"):
        Trainer(adapted_toy(), [], None, cfg())


def test_no_trainable_parameters_refused():
    model = Toy()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, examples(8), None, cfg())


def test_unknown_optimizer_lists_known():
    with pytest.raises(ValueError, match="adamw"):
        Trainer(adapted_toy(), examples(8), None, cfg(optimizer="adamz"))
