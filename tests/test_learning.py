"""The trainer learns (pytest -m learning; CI runs them): the ladder's one-turn rungs through `bash train.sh ladder`,
the same rollout, parser, rewards, HAE and PPO as ALFWorld, with the CPU regime of train.sh. These fail if a sign,
a mask, a normaliser or a ratio in the loop is wrong, which no unit test catches."""
import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.learning
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ladder(tmp_path_factory, task, adv):
    """Training lines of `bash train.sh ladder TASK --adv ADV` (11 iterations, the first critic-only), with the
    task's warm start built once per session."""
    warm = os.path.join(str(tmp_path_factory.getbasetemp()), f"ladder-{task}")
    run = os.path.join(warm, adv)
    subprocess.run(["bash", "train.sh", "ladder", task, "--adv", adv, "--run_dir", run], cwd=ROOT, check=True,
                   env=dict(os.environ, RUN=warm))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [x for x in map(json.loads, f) if "iteration" in x]


def lift(lines):
    """Training success at the end (mean of the last two iterations) minus at the warm start (iteration 1)."""
    return (lines[-1]["success"] + lines[-2]["success"]) / 2 - lines[0]["success"]


@pytest.mark.parametrize("adv", ["hae", "gae", "grpo"])
def test_rung_a_fixed_answer_lifts_success_by_40_points(tmp_path_factory, adv):
    lines = ladder(tmp_path_factory, "fixed", adv)
    assert len(lines) == 11 and lift(lines) >= 0.40, [x["success"] for x in lines]
    assert max(x["invalid_rate"] for x in lines) <= 0.10, [x["invalid_rate"] for x in lines]


def test_rung_b_named_answer_lifts_success_by_30_points(tmp_path_factory):
    lines = ladder(tmp_path_factory, "read", "hae")
    assert len(lines) == 11 and lift(lines) >= 0.30, [x["success"] for x in lines]
    assert max(x["invalid_rate"] for x in lines) <= 0.10, [x["invalid_rate"] for x in lines]
