"""Tables and plots from run folders (their metrics.jsonl), for one run or for `bash train.sh compare`.

    python report.py runs/demo                      # validation success, first vs last evaluation; runs/demo/curve.png
    python report.py --compare runs/compare results # HiPER vs flat PPO-GAE vs GRPO: results/compare.csv, compare.png

A comparison has one run folder per (method, seed), named METHOD-sSEED. Per run: held-out success after
training (valid_seen, valid_unseen), invalid-action rate and mean segment length over the run's training
iterations. The table gives mean ± std over seeds.
"""
import csv
import glob
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {"hae": "HiPER (HAE)", "gae": "PPO, flat GAE", "grpo": "GRPO"}


def read_metrics(run):
    """<run>/metrics.jsonl as (validation lines, training lines)."""
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    return [x for x in lines if "updates" in x], [x for x in lines if "iteration" in x]


def report(run):
    """Print validation success per task type, first vs last evaluation, and plot the learning curves to
    <run>/curve.png (training success per iteration, validation success per evaluation)."""
    evals, train = read_metrics(run)
    first, last = evals[0], evals[-1]
    head = [f"iteration {x['updates']}" for x in (first, last)]
    print(f"\n{'validation success':<52} {head[0]:>12} {head[1]:>12}")
    for key in sorted(k for k in first if k != "updates"):
        print(f"{key:<52} {first[key]:>12.2f} {last.get(key, float('nan')):>12.2f}")
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
    """<out>/compare.csv (one row per run) and compare.png; prints the mean ± std table."""
    rows = []
    for run in finished(os.path.join(root, "*-s*")):
        method, seed = os.path.basename(run).rsplit("-s", 1)
        evals, train = read_metrics(run)
        n_envs = json.load(open(os.path.join(run, "config.json")))["n_envs"]
        rows.append(dict(method=method, seed=int(seed), iterations=len(train),
                         env_steps=round(n_envs * sum(x["episode_length"] for x in train)),
                         valid_seen=evals[-1]["valid_seen/success"], valid_unseen=evals[-1]["valid_unseen/success"],
                         warm_seen=evals[0]["valid_seen/success"], warm_unseen=evals[0]["valid_unseen/success"],
                         invalid_rate=statistics.mean(x["invalid_rate"] for x in train),
                         segment_length=statistics.mean(x["mean_segment_length"] for x in train)))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ms = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}"  # noqa: E731
    print("| method | seeds | env steps | valid_seen | valid_unseen | invalid rate | segment length |")
    print("|---|---|---|---|---|---|---|")
    for m, name in METHODS.items():
        rs = [r for r in rows if r["method"] == m]
        if rs:
            print(f"| {name} | {len(rs)} | {statistics.mean(r['env_steps'] for r in rs):.0f} | "
                  f"{ms([r['valid_seen'] for r in rs])} | {ms([r['valid_unseen'] for r in rs])} | "
                  f"{ms([r['invalid_rate'] for r in rs])} | {ms([r['segment_length'] for r in rs])} |")
    warm = [r["warm_unseen"] for r in rows]
    print(f"warm start (before RL), valid_unseen: {ms(warm)}; valid_seen: {ms([r['warm_seen'] for r in rows])}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for m, name in METHODS.items():
        runs = finished(os.path.join(root, f"{m}-s*"))
        if not runs:
            continue
        curves = [read_metrics(r) for r in runs]
        xs = [x["iteration"] for x in curves[0][1]]
        train = [statistics.mean(c[1][i]["success"] for c in curves) for i in range(len(xs))]
        axes[0].plot(xs, train, ".-", label=name)
        ux = [e["updates"] for e in curves[0][0]]
        held = [[(c[0][i]["valid_seen/success"] + c[0][i]["valid_unseen/success"]) / 2 for c in curves]
                for i in range(len(ux))]
        mean = [statistics.mean(h) for h in held]
        sd = [statistics.stdev(h) if len(h) > 1 else 0 for h in held]
        axes[1].plot(ux, mean, "o-", label=name)
        axes[1].fill_between(ux, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], alpha=0.2)
    axes[0].set(xlabel="iteration", ylabel="success rate", title="training episodes (mean over seeds)")
    axes[1].set(xlabel="iteration", title="held-out games (valid_seen + valid_unseen)")
    axes[1].legend()
    fig.suptitle("Generated ALFWorld games, tiny model: not the paper's benchmark", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=120)


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(*sys.argv[2:4])
    else:
        report(sys.argv[1])
