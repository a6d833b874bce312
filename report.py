"""Tables, verdicts and plots from run folders (their metrics.jsonl), for one run or for `bash train.sh compare`.

    python report.py runs/demo                      # validation success first vs last, the paired verdict
                                                    # (runs/demo/verdict.json) and runs/demo/curve.png
    python report.py --compare runs/compare results # HiPER vs flat PPO-GAE vs GRPO: results/compare.csv, compare.png
    python report.py --ladder runs/ladder-compare results  # the same on the ladder: results/ladder_compare.csv, .png
    python report.py --ladder runs/ladder-long results long  # the long rung: results/ladder_long.csv, .png
    python report.py --ladder runs/ladder-turn results turn  # rung e, reworded: results/ladder_turn.csv, .png
    python report.py --ladder runs/ladder-critic results critic  # rung e, fitted critic: results/ladder_critic.*
    python report.py --variance results runs/ladder-variance runs/ladder-long  # --pg_variance runs: variance.csv

The verdict: held-out success pooled over the validation splits, every game played the same number of times
before and after training from the same sampling seed, so the change is paired per game; its 95 % interval is
scipy's bootstrap over games (percentile method, 10,000 resamples, seeded).

A comparison has one run folder per (method, seed), named METHOD-sSEED. Per run: held-out success after
training (valid_seen, valid_unseen), invalid-action rate and mean segment length over the run's training
iterations. The table gives mean ± std over seeds.
"""
import csv
import glob
import json
import os
import sys

import matplotlib
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {"hae": "HiPER (HAE)", "gae": "PPO, flat GAE", "grpo": "GRPO"}


def read_metrics(run):
    """<run>/metrics.jsonl as (validation lines, training lines)."""
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    return [x for x in lines if "updates" in x], [x for x in lines if "iteration" in x]


def per_game(line):
    """Success per held-out game (mean over its episodes), all validation splits of a validation line in order."""
    return [sum(w) / len(w) for key in sorted(k for k in line if k.endswith("/wins")) for w in line[key]]


def interval(before, after):
    """Mean paired change over games (after − before, one value per game) and its 95 % bootstrap interval."""
    d = np.asarray(after) - np.asarray(before)
    if np.ptp(d) == 0:  # every game changed by the same amount: the interval is that point
        return float(d.mean()), float(d[0]), float(d[0])
    ci = stats.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile", random_state=0).confidence_interval
    return float(d.mean()), float(ci.low), float(ci.high)


def verdict(run):
    """<run>/verdict.json: held-out success before (first validation) and after (last), paired per game."""
    evals, _ = read_metrics(run)
    before, after = per_game(evals[0]), per_game(evals[-1])
    delta, low, high = interval(before, after)
    wins = next(v for k, v in evals[0].items() if k.endswith("/wins"))
    out = dict(before=float(np.mean(before)), after=float(np.mean(after)), delta=delta, ci_low=low, ci_high=high,
               games=len(before), episodes_per_game=len(wins[0]), updates=evals[-1]["updates"])
    with open(os.path.join(run, "verdict.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"held-out success {out['before']:.3f} -> {out['after']:.3f} after {out['updates']} iterations: "
          f"{100 * delta:+.1f} points, 95 % CI [{100 * low:+.1f}, {100 * high:+.1f}] ({out['games']} games, "
          f"{out['episodes_per_game']} episodes per game, paired)")
    return out


def report(run):
    """Print validation success per task type, first vs last evaluation, and the paired verdict; plot the
    learning curves to <run>/curve.png (training success per iteration, validation success per evaluation)."""
    evals, train = read_metrics(run)
    first, last = evals[0], evals[-1]
    head = [f"iteration {x['updates']}" for x in (first, last)]
    print(f"\n{'validation success':<52} {head[0]:>12} {head[1]:>12}")
    for key in sorted(k for k in first if k != "updates" and not k.endswith("/wins")):
        print(f"{key:<52} {first[key]:>12.2f} {last.get(key, float('nan')):>12.2f}")
    verdict(run)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["iteration"] for x in train], [x["success"] for x in train], ".-", alpha=0.5, label="train episodes")
    for split in sorted({k.split("/")[0] for k in first if k.endswith("/success")}):
        ax.plot([x["updates"] for x in evals], [x[f"{split}/success"] for x in evals], "o-", label=split)
    ax.set(xlabel="iteration", ylabel="success rate", ylim=(-0.02, 1.02), title=os.path.normpath(run))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run, "curve.png"), dpi=120)
    print(f"learning curve: {os.path.join(run, 'curve.png')}")


def write_csv(path, rows, digits):
    """rows (dicts with the same keys) to a CSV file at path, floats rounded to `digits`; its folder made if needed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: round(v, digits) if isinstance(v, float) else v for k, v in r.items()} for r in rows])


def finished(pattern):
    """Run folders that completed (train.sh writes curve.png with `report` once hiper.py is done)."""
    return sorted(r for r in glob.glob(pattern) if os.path.exists(os.path.join(r, "curve.png")))


def compare(root, out):
    """<out>/compare.csv (one row per run, then one per method over its seeds, then HiPER − flat GAE) and
    <out>/compare.png; prints the table. A method's change over seeds is the mean over seeds of each game's
    paired change; its interval is the bootstrap over games of that mean (the seeds of a game stay together)."""
    rows, by_method = [], {}
    for run in finished(os.path.join(root, "*-s*")):
        method, seed = os.path.basename(run).rsplit("-s", 1)
        evals, train = read_metrics(run)
        before, after = per_game(evals[0]), per_game(evals[-1])
        by_method.setdefault(method, []).append((before, after))
        n_envs = json.load(open(os.path.join(run, "config.json")))["n_envs"]
        third = max(1, len(train) // 3)
        rows.append(dict(method=method, seed=seed, iterations=len(train),
                         env_steps=round(n_envs * sum(x["episode_length"] for x in train)),
                         before=np.mean(before), after=np.mean(after), **dict(zip(("delta", "ci_low", "ci_high"),
                                                                                   interval(before, after))),
                         train_first_third=np.mean([x["success"] for x in train[:third]]),
                         train_last_third=np.mean([x["success"] for x in train[-third:]]),
                         invalid_rate=np.mean([x["invalid_rate"] for x in train]),
                         segment_length=np.mean([x["mean_segment_length"] for x in train])))
    summary = {}
    for m, runs in by_method.items():  # per game: mean over seeds of before and after
        summary[m] = (np.mean([b for b, _ in runs], 0), np.mean([a for _, a in runs], 0))
        rs = [r for r in rows if r["method"] == m]
        rows.append(dict(method=m, seed=f"{len(runs)} seeds", iterations=rs[0]["iterations"],
                         env_steps=round(np.mean([r["env_steps"] for r in rs])), before=summary[m][0].mean(),
                         after=summary[m][1].mean(), **dict(zip(("delta", "ci_low", "ci_high"), interval(*summary[m]))),
                         **{k: np.mean([r[k] for r in rs]) for k in ("train_first_third", "train_last_third",
                                                                     "invalid_rate", "segment_length")}))
    if {"hae", "gae"} <= set(summary):  # HiPER − flat GAE: per game, the difference of the two changes
        d_hae, d_gae = (summary[m][1] - summary[m][0] for m in ("hae", "gae"))
        rows.append(dict(method="hae - gae", seed="per game", **dict(zip(("delta", "ci_low", "ci_high"),
                                                                          interval(d_gae, d_hae)))))
    write_csv(os.path.join(out, "compare.csv"), rows, 4)
    print("| method | seeds | iterations | held-out before | after | change (points) | 95 % CI | train success, "
          "first → last third |")
    print("|---|---|---|---:|---:|---:|---|---|")
    for r in rows:
        if not str(r["seed"]).isdigit() and r["method"] != "hae - gae":
            ci = f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
            print(f"| {METHODS[r['method']]} | {r['seed']} | {r['iterations']} | {r['before']:.3f} | "
                  f"{r['after']:.3f} | {100 * r['delta']:+.1f} | {ci} | "
                  f"{r['train_first_third']:.2f} → {r['train_last_third']:.2f} |")
    for r in rows:
        if r["method"] == "hae - gae":
            print(f"HiPER − flat GAE, change in held-out success: {100 * r['delta']:+.1f} points, 95 % CI "
                  f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] (bootstrap over games)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for m, name in METHODS.items():
        curves = [read_metrics(r) for r in finished(os.path.join(root, f"{m}-s*"))]
        if not curves:
            continue
        xs = [x["iteration"] for x in curves[0][1]]
        axes[0].plot(xs, [np.mean([c[1][i]["success"] for c in curves]) for i in range(len(xs))], ".-", label=name)
        ux = [e["updates"] for e in curves[0][0]]
        held = np.array([[np.mean(per_game(c[0][i])) for c in curves] for i in range(len(ux))])  # [evals, seeds]
        axes[1].plot(ux, held.mean(1), "o-", label=name)
        axes[1].fill_between(ux, held.min(1), held.max(1), alpha=0.2)
    axes[0].set(xlabel="iteration", ylabel="success rate", title="training episodes (mean over seeds)")
    axes[1].set(xlabel="iteration", title="held-out games, pooled (mean; band: min-max over seeds)")
    axes[1].legend()
    fig.suptitle("Generated ALFWorld games, tiny model: not the paper's benchmark", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=120)


def mean_ci(x):
    """Mean over seeds and its 95 % bootstrap interval (scipy, percentile, 10,000 resamples, seeded)."""
    x = np.asarray(x, float)
    if len(x) < 2 or np.ptp(x) == 0:  # one seed: no interval; all seeds alike: that point
        return float(x.mean()), (float(x[0]) if len(x) > 1 else np.nan), (float(x[0]) if len(x) > 1 else np.nan)
    ci = stats.bootstrap((x,), np.mean, n_resamples=10_000, method="percentile", random_state=0).confidence_interval
    return float(x.mean()), float(ci.low), float(ci.high)


def diff_ci(x, y):
    """mean(x) − mean(y) over independent seeds and its 95 % bootstrap interval (each sample resampled alone)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if min(len(x), len(y)) < 2 or np.ptp(x) == np.ptp(y) == 0:
        d = float(x.mean() - y.mean())
        return (d, d, d) if min(len(x), len(y)) > 1 else (d, np.nan, np.nan)
    ci = stats.bootstrap((x, y), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis), n_resamples=10_000,
                         method="percentile", random_state=0).confidence_interval
    return float(x.mean() - y.mean()), float(ci.low), float(ci.high)


RUNGS = {  # rung: (output name, the last iterations whose training success is a run's endpoint, plot title)
    "stages": ("ladder_compare", 2, "The ladder's stages task (3 lights in order, terminal reward), tiny model"),
    "long": ("ladder_long", 3, "The long rung (8 lights in order in 14 steps, terminal reward), tiny model"),
    "turn": ("ladder_turn", 3, "The long rung reworded (subgoal `turn off light k`: no token of a tag), tiny model"),
    "critic": ("ladder_critic", 3, "Rung e with a fitted critic (4 passes a batch, 2 critic-only iterations first)"),
}


def ladder(root, out, rung="stages", target=0.8):
    """A ladder comparison (`bash train.sh ladder-compare` or `ladder-long`): <out>/<name>.csv, one row per run
    METHOD-sSEED under root, and <out>/<name>.png; prints the table and HiPER − flat GAE. Per run: training
    success at the end (mean of the rung's last iterations), the first iteration whose training success reaches
    `target` (iterations + 1 if none), held-out success before and after (the test instances, paired seeds) and
    the critic's explained variance per head over the last half of the run. HiPER − flat GAE after RL is also
    paired per held-out instance and seed (the same instances and sampling seeds), its interval over seeds."""
    name, last, title = RUNGS[rung]
    rows, after = [], {}
    for run in sorted(glob.glob(os.path.join(root, "*-s*"))):
        if not os.path.exists(os.path.join(run, "done")):
            continue
        method, seed = os.path.basename(run).rsplit("-s", 1)
        evals, train = read_metrics(run)
        success = [x["success"] for x in train]
        after[method, int(seed)] = np.array(per_game(evals[-1]))
        ev = lambda h: np.mean([x[f"explained_variance_{h}"] for x in train[len(train) // 2:]  # noqa: E731
                                if x.get(f"explained_variance_{h}") is not None] or [np.nan])
        rows.append(dict(method=method, seed=int(seed), final_success=np.mean(success[-last:]),
                         iters_to_target=next((i + 1 for i, s in enumerate(success) if s >= target), len(train) + 1),
                         heldout_before=np.mean(per_game(evals[0])), heldout_after=np.mean(after[method, int(seed)]),
                         invalid_rate=np.mean([x["invalid_rate"] for x in train]),
                         switch_rate=np.mean([x["switch_rate"] for x in train]),
                         ev_low=ev("low"), ev_high=ev("high"), ev_term=ev("term")))
    write_csv(os.path.join(out, f"{name}.csv"), rows, 4)
    by = {m: [r for r in rows if r["method"] == m] for m in METHODS if any(r["method"] == m for r in rows)}
    ci = lambda t: f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"  # noqa: E731
    ev_mean = lambda xs: np.mean([x for x in xs if not np.isnan(x)] or [np.nan])  # noqa: E731  GRPO: no critic
    print(f"| method | seeds | training success, last {last} iterations | iterations to {target} | held-out before | "
          "after | explained variance (low, high) |")
    print("|---|---:|---|---|---|---|---|")
    for m, rs in by.items():
        col = lambda k: [r[k] for r in rs]  # noqa: E731
        print(f"| {METHODS[m]} | {len(rs)} | {ci(mean_ci(col('final_success')))} | "
              f"{ci(mean_ci(col('iters_to_target')))} | {ci(mean_ci(col('heldout_before')))} | "
              f"{ci(mean_ci(col('heldout_after')))} | {ev_mean(col('ev_low')):.2f}, {ev_mean(col('ev_high')):.2f} |")
    if {"hae", "gae"} <= set(by):
        for key, label in (("final_success", f"training success, last {last} iterations"),
                           ("iters_to_target", f"iterations to {target}")):
            d = diff_ci([r[key] for r in by["hae"]], [r[key] for r in by["gae"]])
            print(f"HiPER − flat GAE, {label}: {d[0]:+.3f}, 95 % CI [{d[1]:+.3f}, {d[2]:+.3f}] (bootstrap over seeds)")
        paired = [(after["hae", s] - after["gae", s]).mean() for s in sorted({s for _, s in after})
                  if ("hae", s) in after and ("gae", s) in after]
        d = mean_ci(paired)
        print(f"HiPER − flat GAE, held-out success after RL, paired per instance and seed: {d[0]:+.3f}, 95 % CI "
              f"[{d[1]:+.3f}, {d[2]:+.3f}] ({len(paired)} seeds, bootstrap over seeds)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for m, rs in by.items():
        curves = np.array([[x["success"] for x in read_metrics(os.path.join(root, f"{m}-s{r['seed']}"))[1]]
                           for r in rs])  # [seeds, iterations]
        xs = np.arange(1, curves.shape[1] + 1)
        bands = np.array([mean_ci(c) for c in curves.T])
        axes[0].plot(xs, bands[:, 0], ".-", label=METHODS[m])
        axes[0].fill_between(xs, bands[:, 1], bands[:, 2], alpha=0.2)
        held = [mean_ci([r[k] for r in rs]) for k in ("heldout_before", "heldout_after")]
        axes[1].errorbar([0, 1], [h[0] for h in held], yerr=np.abs(np.array([[h[1], h[2]] for h in held]).T
                                                                   - [h[0] for h in held]), fmt="o-", capsize=3,
                         label=METHODS[m])
    axes[0].set(xlabel="iteration", ylabel="success rate", ylim=(-0.02, 1.02),
                title="training episodes (mean over seeds, 95 % CI)")
    axes[1].set(xticks=[0, 1], xticklabels=["warm start", "after RL"], ylim=(-0.02, 1.02),
                title="held-out instances (mean over seeds, 95 % CI)")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)


def variance(out, *roots):
    """<out>/variance.csv and variance.png from every run under `roots` that logged --pg_variance: per iteration,
    the policy gradient's variance under HAE and flat GAE on the same batch and critic, their ratio, and the
    critic's explained variance per head (METHOD.md §12)."""
    rows = []
    for root in roots:
        for run in sorted(glob.glob(os.path.join(root, "*-s*", "done"))):
            run = os.path.dirname(run)
            method, seed = os.path.basename(run).rsplit("-s", 1)
            with open(os.path.join(run, "config.json")) as f:
                rung = json.load(f)["env"].split(":")[-1].lower()
            for x in read_metrics(run)[1]:
                if "pg_var_hae" in x:
                    rows.append(dict(rung=rung, method=method, seed=int(seed),
                                     iteration=x["iteration"], success=x["success"],
                                     **{f"ev_{h}": x[f"explained_variance_{h}"] for h in ("low", "high", "term")},
                                     **{k: x[k] for k in ("pg_var_hae", "pg_var_gae", "pg_mean_sq_hae",
                                                          "pg_mean_sq_gae")}, ratio=x["pg_var_hae"] / x["pg_var_gae"]))
    write_csv(os.path.join(out, "variance.csv"), rows, 6)
    print("| runs | iterations | variance ratio HAE / flat GAE: median [IQR] | iterations with ratio < 1 | "
          "V_high's explained variance: median (max) |")
    print("|---|---:|---|---:|---|")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for key in sorted({(r["rung"], r["method"]) for r in rows}):
        rs = [r for r in rows if (r["rung"], r["method"]) == key]
        q = np.percentile([r["ratio"] for r in rs], [25, 50, 75])
        ev_high = [r["ev_high"] for r in rs if r["ev_high"] is not None]
        print(f"| {key[0]}, {METHODS[key[1]]} | {len(rs)} | {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}] | "
              f"{sum(r['ratio'] < 1 for r in rs)} | {np.median(ev_high):.2f} ({max(ev_high):.2f}) |")
        for ax, head in zip(axes, ("high", "low")):
            pts = [(r[f"ev_{head}"], r["ratio"]) for r in rs if r[f"ev_{head}"] is not None]
            ax.scatter(*zip(*pts), s=12, alpha=0.6, label=f"{key[0]}, {METHODS[key[1]]}")
    for ax, head in zip(axes, ("high", "low")):
        ax.axhline(1, color="grey", lw=0.8)
        ax.set(xlabel=f"explained variance of V_{head} (axis cut at −1)", yscale="log", xlim=(-1, 1))
    axes[0].set(ylabel="Var(HAE) / Var(flat GAE)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Policy-gradient variance across minibatches of one batch, the same rollouts and critic", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "variance.png"), dpi=120)


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(*sys.argv[2:4])
    elif sys.argv[1] == "--ladder":
        ladder(*sys.argv[2:5])
    elif sys.argv[1] == "--variance":
        variance(*sys.argv[2:])
    else:
        report(sys.argv[1])
