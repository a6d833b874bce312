"""Tables, verdicts and plots from run folders (their metrics.jsonl), for one run or for `bash train.sh compare`.

    python report.py runs/demo                      # validation success first vs last, the paired verdict
                                                    # (runs/demo/verdict.json) and runs/demo/curve.png
    python report.py --compare runs/compare results # HiPER vs flat PPO-GAE vs GRPO: results/compare.csv, compare.png

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
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows])
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


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(*sys.argv[2:4])
    else:
        report(sys.argv[1])
