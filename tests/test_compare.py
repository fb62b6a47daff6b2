"""`loralab compare`: every method on the same data and steps, a learning-rate sweep each, results written."""

import csv
import math

import pytest
import torch

from loralab.train.compare import GRIDS, compare, next_rate, parse_variant, sweep


@pytest.mark.slow
def test_compare_writes_a_row_per_method(tmp_path):
    rows = compare("minilm-l6", "sst2", ["lora", "svfit"], str(tmp_path), budget=2, lr_grid=3, batch_size=8,
                   max_train=32, dev_size=16, max_test=16, progress=False, extend=0)
    assert [r.method for r in rows] == ["lora", "svfit"]
    lora, svfit = rows
    assert lora.trainable_params > 100 * svfit.trainable_params  # r·(in+out) per layer vs r per layer
    assert lora.best_lr in [1e-3 * f for f in GRIDS[3]] and svfit.best_lr in [1e-2 * f for f in GRIDS[3]]
    with open(tmp_path / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["lora", "svfit"]
    assert (tmp_path / "results.png").stat().st_size > 1000 and "| lora |" in (tmp_path / "results.md").read_text()

    resumed = compare("minilm-l6", "sst2", ["lora", "svfit", "ia3"], str(tmp_path), budget=2, lr_grid=3,
                      batch_size=8, max_train=32, dev_size=16, max_test=16, progress=False, resume=True, extend=0)
    assert resumed[:2] == rows and resumed[2].method == "ia3"  # the finished rows are kept, not rerun
    with pytest.raises(ValueError, match="budget: 2 there, 3 now"):
        compare("minilm-l6", "sst2", ["lora"], str(tmp_path), budget=3, lr_grid=3, batch_size=8,
                max_train=32, dev_size=16, max_test=16, progress=False, resume=True, extend=0)


@pytest.mark.slow
def test_compare_does_not_depend_on_the_callers_random_state(tmp_path):
    def once(caller_seed, out):
        torch.manual_seed(caller_seed)  # e.g. another process, or whatever ran before in this one
        return compare("minilm-l6", "sst2", ["lora"], str(tmp_path / out), budget=2, lr_grid=1, batch_size=8,
                       max_train=32, dev_size=16, max_test=64, progress=False)[0]

    first, second = once(1, "a"), once(2, "b")
    assert (first.dev_metric, first.test_metric) == (second.dev_metric, second.test_metric)


def test_unknown_method_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="did you mean: lora"):
        compare("minilm-l6", "sst2", ["lroa"], str(tmp_path))


def test_a_variant_trains_with_its_options(tmp_path):
    rows = compare("minilm-l6", "sst2", ["uni-lora:dim=64", "uni-lora:dim=96:start=uniform"], str(tmp_path),
                   budget=2, lr_grid=1, batch_size=8, max_train=16, dev_size=8, max_test=8, progress=False)
    assert [row.method for row in rows] == ["uni-lora:dim=64", "uni-lora:dim=96:start=uniform"]
    assert rows[1].trainable_params - rows[0].trainable_params == 32  # one θ of each size, the same head


def test_variant_options_are_parsed_and_checked():
    assert parse_variant("bone:share=rows") == ("bone", {"share": "rows"})
    assert parse_variant("uni-lora:dim=64:seed=3") == ("uni-lora", {"dim": 64, "seed": 3})
    assert parse_variant("lora") == ("lora", {})
    with pytest.raises(ValueError, match="bone has no option 'shar'; it takes: share"):
        parse_variant("bone:shar=rows")
    with pytest.raises(ValueError, match="'share' is not key=value"):
        parse_variant("bone:share")


def test_rate_ladder_continues_the_grids():
    assert [round(next_rate(f, up=True), 6) for f in (0.1, 0.3, 1.0, 3.0, 10.0)] == [0.3, 1.0, 3.0, 10.0, 30.0]
    assert [round(next_rate(f, up=False), 6) for f in (0.1, 0.3, 1.0, 3.0)] == [0.03, 0.1, 0.3, 1.0]
    assert all(g == round(next_rate(f, up=True), 6) for f, g in zip(GRIDS[5], GRIDS[5][1:]))


def test_sweep_follows_the_best_rate_past_the_grid_edge():
    def peaked_at(peak):
        tried = []

        def score(f):
            tried.append(round(f, 6))
            return -abs(math.log(f / peak))
        return score, tried

    score, tried = peaked_at(10.0)  # above the grid: two steps up find it, inside the ladder
    best, at_edge, scores = sweep(score, GRIDS[3], extend=3)
    assert round(best, 6) == 10.0 and not at_edge and tried == [0.3, 1.0, 3.0, 10.0, 30.0]
    score, tried = peaked_at(0.01)  # far below: the extension budget runs out, the row says so
    best, at_edge, _ = sweep(score, GRIDS[3], extend=2)
    assert round(best, 6) == 0.03 and at_edge and tried == [0.3, 1.0, 3.0, 0.1, 0.03]
    score, tried = peaked_at(1.0)  # inside the grid: nothing more is tried
    assert sweep(score, GRIDS[3], extend=2)[:2] == (1.0, False) and tried == [0.3, 1.0, 3.0]
    score, tried = peaked_at(5.0)
    assert sweep(score, GRIDS[1], extend=2)[:2] == (1.0, False) and tried == [1.0]  # one rate: no edge to leave
