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


def test_ladder_comparison_by_hand(tmp_path):
    """Two methods × three seeds: final success is the mean of the last two training iterations, iterations to 0.8
    the first one that reaches it (iterations + 1 if none); HiPER − flat GAE is a difference of means over seeds."""
    import csv
    curves = {("hae", 1): [0.3, 0.8, 0.9], ("hae", 2): [0.3, 0.5, 0.7], ("hae", 3): [0.4, 0.9, 1.0],
              ("gae", 1): [0.3, 0.4, 0.6], ("gae", 2): [0.2, 0.5, 0.5], ("gae", 3): [0.3, 0.6, 0.8]}
    for (method, seed), success in curves.items():
        run = tmp_path / "runs" / f"{method}-s{seed}"
        run.mkdir(parents=True)
        lines = [dict(updates=0, **{"test/wins": [[0], [1]]})] + [
            dict(iteration=i + 1, success=s, invalid_rate=0.0, switch_rate=0.5, explained_variance_low=0.5,
                 explained_variance_high=None, explained_variance_term=0.1) for i, s in enumerate(success)] + [
            dict(updates=3, **{"test/wins": [[1], [1]]})]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (run / "done").write_text("")
    report.ladder(str(tmp_path / "runs"), str(tmp_path / "out"))
    rows = {(r["method"], r["seed"]): r for r in csv.DictReader(open(tmp_path / "out" / "ladder_compare.csv"))}
    assert float(rows[("hae", "1")]["final_success"]) == pytest.approx(0.85)
    assert [int(rows[("hae", str(s))]["iters_to_target"]) for s in (1, 2, 3)] == [2, 4, 2]
    assert [int(rows[("gae", str(s))]["iters_to_target"]) for s in (1, 2, 3)] == [4, 4, 3]
    assert float(rows[("hae", "1")]["heldout_before"]) == 0.5 and float(rows[("hae", "1")]["heldout_after"]) == 1.0
    assert rows[("hae", "1")]["ev_high"] == "nan" and float(rows[("hae", "1")]["ev_low"]) == 0.5
    d, low, high = report.diff_ci([0.85, 0.6, 0.95], [0.5, 0.5, 0.7])
    assert d == pytest.approx(0.2333, abs=1e-3) and low <= d <= high
    assert (tmp_path / "out" / "ladder_compare.png").stat().st_size > 0


def test_long_rung_pairs_held_out_instances_per_seed_and_variance_reads_the_diagnostic(tmp_path, capsys):
    """The long rung: the endpoint is the mean of the last three iterations; HiPER − flat GAE after RL is, per
    seed, the mean over held-out instances of the two methods' difference (seed 1: (1 − 0 + 0 − 0) / 2 = 0.5,
    seed 2: (1 − 1 + 1 − 0) / 2 = 0.5). variance.csv has a row per iteration that logged --pg_variance."""
    import csv
    after = {("hae", 1): [[1], [0]], ("gae", 1): [[0], [0]], ("hae", 2): [[1], [1]], ("gae", 2): [[1], [0]]}
    for (method, seed), wins in after.items():
        run = tmp_path / "runs" / f"{method}-s{seed}"
        run.mkdir(parents=True)
        train = [dict(iteration=i + 1, success=s, invalid_rate=0.0, switch_rate=0.5, explained_variance_low=0.2 * i,
                      explained_variance_high=0.1 * i, explained_variance_term=None) for i, s in
                 enumerate([0.1, 0.2, 0.3, 0.7])]
        if method == "hae":
            for i, x in enumerate(train):
                x.update(pg_var_hae=1.0 + i, pg_var_gae=4.0, pg_mean_sq_hae=0.5, pg_mean_sq_gae=0.25)
        lines = [dict(updates=0, **{"test/wins": [[0], [0]]})] + train + [dict(updates=4, **{"test/wins": wins})]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (run / "done").write_text("")
        (run / "config.json").write_text(json.dumps(dict(env="demo:Long")))
    (tmp_path / "runs" / "warm-start").mkdir()  # the rung's warm start beside its runs: not a run
    report.ladder(str(tmp_path / "runs"), str(tmp_path / "out"), "long")
    rows = {(r["method"], r["seed"]): r for r in csv.DictReader(open(tmp_path / "out" / "ladder_long.csv"))}
    assert float(rows[("hae", "1")]["final_success"]) == pytest.approx(0.4)
    assert "paired per instance and seed: +0.500, 95 % CI [+0.500, +0.500] (2 seeds" in capsys.readouterr().out
    report.variance(str(tmp_path / "out"), str(tmp_path / "runs"))
    rows = list(csv.DictReader(open(tmp_path / "out" / "variance.csv")))
    assert len(rows) == 8 and {(r["rung"], r["method"]) for r in rows} == {("long", "hae")}
    assert [float(r["ratio"]) for r in rows if r["seed"] == "1"] == [0.25, 0.5, 0.75, 1.0]
    assert (tmp_path / "out" / "variance.png").stat().st_size > 0
