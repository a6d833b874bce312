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


def test_compare_pairs_seeds_per_game_and_differences_the_methods(tmp_path):
    """Two methods × two seeds, two games of one episode: a method's change is the mean over seeds of each
    game's change; HiPER − flat GAE is the per-game difference of the two changes."""
    import csv
    wins = {("hae", 1): ([[0], [0]], [[1], [0]]), ("hae", 2): ([[0], [1]], [[1], [1]]),
            ("gae", 1): ([[0], [0]], [[0], [0]]), ("gae", 2): ([[1], [0]], [[1], [0]])}
    for (method, seed), (before, after) in wins.items():
        run = tmp_path / "runs" / f"{method}-s{seed}"
        run.mkdir(parents=True)
        lines = [dict(updates=0, **{"valid_seen/wins": before}),
                 dict(iteration=1, success=0.5, episode_length=3.0, invalid_rate=0.0, mean_segment_length=2.0),
                 dict(updates=1, **{"valid_seen/wins": after})]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (run / "config.json").write_text(json.dumps(dict(n_envs=4)))
        (run / "curve.png").write_bytes(b"")
    report.compare(str(tmp_path / "runs"), str(tmp_path / "out"))
    rows = {(r["method"], r["seed"]): r for r in csv.DictReader(open(tmp_path / "out" / "compare.csv"))}
    # hae, means over seeds per game: before (0, 0.5), after (1, 0.5): changes (1, 0), +0.5; gae: changes (0, 0)
    assert float(rows[("hae", "2 seeds")]["delta"]) == 0.5 and float(rows[("gae", "2 seeds")]["delta"]) == 0.0
    assert float(rows[("hae - gae", "per game")]["delta"]) == 0.5
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0
