"""`loralab compare`: every method on the same data and steps, a learning-rate sweep each, results written."""

import csv

import pytest

from loralab.train.compare import GRIDS, compare


@pytest.mark.slow
def test_compare_writes_a_row_per_method(tmp_path):
    rows = compare("minilm-l6", "sst2", ["lora", "svfit"], str(tmp_path), budget=2, lr_grid=3, batch_size=8,
                   max_train=32, dev_size=16, max_test=16, progress=False)
    assert [r.method for r in rows] == ["lora", "svfit"]
    lora, svfit = rows
    assert lora.trainable_params > 100 * svfit.trainable_params  # r·(in+out) per layer vs r per layer
    assert lora.best_lr in [1e-3 * f for f in GRIDS[3]] and svfit.best_lr in [1e-2 * f for f in GRIDS[3]]
    with open(tmp_path / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["lora", "svfit"]
    assert (tmp_path / "results.png").stat().st_size > 1000 and "| lora |" in (tmp_path / "results.md").read_text()

    resumed = compare("minilm-l6", "sst2", ["lora", "svfit", "ia3"], str(tmp_path), budget=2, lr_grid=3,
                      batch_size=8, max_train=32, dev_size=16, max_test=16, progress=False, resume=True)
    assert resumed[:2] == rows and resumed[2].method == "ia3"  # the finished rows are kept, not rerun
    with pytest.raises(ValueError, match="budget: 2 there, 3 now"):
        compare("minilm-l6", "sst2", ["lora"], str(tmp_path), budget=3, lr_grid=3, batch_size=8,
                max_train=32, dev_size=16, max_test=16, progress=False, resume=True)


def test_unknown_method_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="did you mean: lora"):
        compare("minilm-l6", "sst2", ["lroa"], str(tmp_path))
