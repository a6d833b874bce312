"""report.py: the paired verdict from a run's validation lines, checked by hand."""
import json

import pytest

import report


def write_run(tmp_path, before, after):
    """A run folder whose first and last validation lines hold these per-game wins (two splits)."""
    lines = [dict(updates=0, **{"valid_seen/wins": before[:2], "valid_unseen/wins": before[2:]}),
             dict(iteration=1, success=0.5),
             dict(updates=1, **{"valid_seen/wins": after[:2], "valid_unseen/wins": after[2:]})]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(tmp_path)


def test_verdict_pools_the_splits_and_pairs_each_game(tmp_path):
    """Four games, two episodes each: per-game success 0, 0.5, 0, 1 before and 0.5, 1, 0, 1 after, so the
    pooled success goes 0.375 → 0.625 and every game's change is 0.5, 0.5, 0 or 0 (mean 0.25)."""
    run = write_run(tmp_path, [[0, 0], [1, 0], [0, 0], [1, 1]], [[1, 0], [1, 1], [0, 0], [1, 1]])
    v = report.verdict(run)
    assert (v["before"], v["after"], v["delta"]) == (0.375, 0.625, 0.25)
    assert (v["games"], v["episodes_per_game"]) == (4, 2)
    assert 0 <= v["ci_low"] <= 0.25 <= v["ci_high"] <= 0.5  # resampled means of {0.5, 0.5, 0, 0} lie in [0, 0.5]
    assert json.load(open(tmp_path / "verdict.json")) == v


def test_interval_of_identical_changes_is_that_point():
    assert report.interval([0.0, 0.5, 1.0], [0.5, 1.0, 1.5]) == (0.5, 0.5, 0.5)
    mean, low, high = report.interval([0.0] * 30, [1.0] * 10 + [0.0] * 20)
    assert mean == pytest.approx(1 / 3) and 0.1 < low < 1 / 3 < high < 0.6
