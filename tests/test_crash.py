"""Crash safety: a CPU training run killed with SIGKILL mid-iteration, while it writes a checkpoint, or between
the checkpoint's renames, then resumed with --resume, ends with the same weights and optimizer states as an
uninterrupted run, bit for bit, and its metrics.jsonl holds each iteration and each validation once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
WALL_CLOCK = {"rollout_s", "update_s", "tokens_per_s", "env_steps_per_s", "peak_memory_gb"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One small game per split, a tiny model, and an uninterrupted 4-iteration run (validations at 0, 2, 4)."""
    d = tmp_path_factory.mktemp("crash")
    data = str(d / "alf")
    for split in ("train", "valid_seen", "valid_unseen"):
        demo.generate_alfworld_games(data, 1, seed=2, split=split, task_types=("pick_and_place_simple",),
                                     max_receptacles=5, n_distractors=0)
    demo.build_tiny(str(d / "tiny"), demo.game_texts(data), seed=6)
    args = ["--model", str(d / "tiny"), "--data_dir", data, "--n_envs", "3", "--max_turns", "3",
            "--env_max_steps", "3", "--max_new_tokens", "16", "--iters", "4", "--eval_every", "2", "--save_every",
            "1", "--minibatch", "6", "--microbatch", "3", "--env_workers", "1", "--actor_lr", "1e-3",
            "--critic_lr", "1e-3"]
    full = str(d / "full")
    subprocess.run([sys.executable, "hiper.py", *args, "--run_dir", full], cwd=ROOT, env=ENV, check=True)
    return d, args, fingerprint(full)


def fingerprint(run):
    """The final policy, critic and optimizer states, and the metrics without their wall-clock fields."""
    ckpt = os.path.join(run, "checkpoint")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    lines = [{k: v for k, v in json.loads(x).items() if k not in WALL_CLOCK} for x in open(f"{run}/metrics.jsonl")]
    return load_file(os.path.join(ckpt, "policy", "model.safetensors")), state, lines


def assert_same(got, want):
    (policy, state, lines), (policy0, state0, lines0) = got, want
    assert [x.get("iteration") for x in lines if "iteration" in x] == [1, 2, 3, 4]
    assert [x.get("updates") for x in lines if "updates" in x] == [0, 2, 4]
    assert lines == lines0
    assert policy.keys() == policy0.keys() and all(torch.equal(policy[k], policy0[k]) for k in policy)
    assert state["iteration"] == state0["iteration"] == 4 and state["rng"] == state0["rng"]
    for key in ("critic", "actor_opt", "critic_opt"):
        flat, flat0 = flatten(state[key]), flatten(state0[key])
        assert flat.keys() == flat0.keys() and all(torch.equal(flat[k], flat0[k]) for k in flat)


def flatten(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}/{key}").items()}
    return {}


@pytest.mark.parametrize("point, n", [("update", 5), ("save", 3), ("rename", 2)])
def test_killed_run_resumes_to_the_uninterrupted_result(setup, point, n):
    """update 5: inside iteration 3's critic update; save 3: half of iteration 3's state.pt written; rename 2:
    at iteration 3, after the old checkpoint moved to checkpoint.prev and before the new one moved in."""
    d, args, want = setup
    run = str(d / f"{point}{n}")
    killed = subprocess.run([sys.executable, "tests/crash_driver.py", point, str(n), *args, "--run_dir", run],
                            cwd=ROOT, env=ENV)
    assert killed.returncode == -signal.SIGKILL
    if point == "rename":  # no checkpoint/ left; a broken one in its place must be reported and passed over
        assert not os.path.exists(f"{run}/checkpoint") and os.path.exists(f"{run}/checkpoint.prev/state.pt")
        os.makedirs(f"{run}/checkpoint")
        open(f"{run}/checkpoint/state.pt", "wb").write(b"not a checkpoint")
    out = subprocess.run([sys.executable, "hiper.py", *args, "--run_dir", run, "--resume"], cwd=ROOT, env=ENV,
                         check=True, capture_output=True, text=True)
    if point == "rename":
        assert f"{run}/checkpoint is incomplete or unreadable" in out.stdout
    assert_same(fingerprint(run), want)


def test_run_killed_from_outside_resumes_to_the_uninterrupted_result(setup):
    """kill -9 from another process once iteration 2 is logged (during iteration 3, or its checkpoint)."""
    d, args, want = setup
    run = str(d / "outside")
    proc = subprocess.Popen([sys.executable, "hiper.py", *args, "--run_dir", run], cwd=ROOT, env=ENV)
    metrics = os.path.join(run, "metrics.jsonl")
    while proc.poll() is None and not (os.path.exists(metrics) and '"iteration": 2' in open(metrics).read()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    subprocess.run([sys.executable, "hiper.py", *args, "--run_dir", run, "--resume"], cwd=ROOT, env=ENV, check=True)
    assert_same(fingerprint(run), want)
