"""Rank schedules keep state outside the trainable parameters (importance averages, masks, the
squeeze); a run interrupted at a checkpoint and resumed must reach the uninterrupted run's
parameters, masks and losses bit for bit."""

import shutil

import pytest
import torch
from trainer_toy import Toy, examples, trainable_state

import loralab as ll
from loralab.train import TrainConfig, Trainer

CASES = {
    "adalora": (dict(method="adalora", r=4), {"target_rank": 2, "warmup": 2, "final": 2, "interval": 2}),
    "increlora": (dict(method="adalora", r=4, options={"init_rank": 1}), {"target_rank": 3, "interval": 2}),
    "dylora": (dict(method="dylora", r=4), {}),
    "sora": (dict(method="sora", r=4), {"sparsity": 5.0}),
    "lora-squeeze": (dict(method="lora", r=4), {"rank": 2, "at": 3}),
}


def model_for(schedule):
    model = Toy()  # dropout on: the RNG state matters too
    spec, _ = CASES[schedule]
    ll.add_adapter(model, ll.AdapterSpec(alpha=8, targets=["hidden"], modules_to_save=["head"], **spec))
    return model


def config(schedule, **kw):
    base = dict(lr=2e-2, batch_size=16, max_steps=10, progress=False, schedule="constant", log_every=1)
    return TrainConfig(**{**base, **kw}, rank_schedule=schedule, rank_options=CASES[schedule][1])


def masks(model):
    return [m.rank_mask.clone() for m in model.modules() if hasattr(m, "rank_mask")]


@pytest.mark.parametrize("schedule", CASES)
def test_resumed_run_matches_uninterrupted_run(schedule, tmp_path):
    straight = model_for(schedule)
    full = Trainer(straight, examples(64), None,
                   config(schedule, save_every=5, keep_last=5, out_dir=str(tmp_path / "a")))
    full.train()
    shutil.copytree(tmp_path / "a" / "checkpoint-5", tmp_path / "b" / "checkpoint-5")
    again = model_for(schedule)
    resumed = Trainer(again, examples(64), None, config(schedule, out_dir=str(tmp_path / "b")))
    resumed.train(resume_from="latest")
    want = trainable_state(straight)
    got = trainable_state(again)
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0)
    for got_mask, want_mask in zip(masks(again), masks(straight), strict=True):
        torch.testing.assert_close(got_mask, want_mask, atol=0, rtol=0)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history if r["step"] > 5]


def test_stateful_schedules_change_state_before_the_checkpoint(tmp_path):
    """The adalora and increlora cases above would pass without the schedule state only if the masks
    had not moved by step 5: they have."""
    for schedule in ("adalora", "increlora"):
        model = model_for(schedule)
        start = masks(model)
        Trainer(model, examples(64), None, config(schedule, max_steps=5)).train()
        assert any(not torch.equal(a, b) for a, b in zip(masks(model), start))


def test_resume_refuses_another_rank_schedule(tmp_path):
    Trainer(model_for("adalora"), examples(64), None, config("adalora", max_steps=2, out_dir=str(tmp_path))).train()
    with pytest.raises(ValueError, match="rank_schedule='adalora'.*resume with the same"):
        Trainer(model_for("adalora"), examples(64), None,
                TrainConfig(max_steps=4, progress=False, out_dir=str(tmp_path))).train(resume_from="latest")
