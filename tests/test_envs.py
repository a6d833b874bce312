"""envs.py on the real ALFWorld engine with generated games, the pool, and WebShop against a fake engine."""
import json
import os
import random

import pytest

import envs
from tests.fake_webshop import FakeWebShop


@pytest.mark.parametrize("split", ["train", "valid_seen", "valid_unseen"])
def test_planner_expert_wins_every_game(alf_data, split):
    env = envs.make("alfworld", split=split, data_dir=alf_data, expert=True)
    seen_types = set()
    for gi in range(len(env.game_files)):
        obs, info = env.reset(gi)
        assert info["task"] and info["task"] in obs and "help" in info["admissible_actions"]
        seen_types.add(info["task_type"])
        for _ in range(30):
            obs, reward, terminated, truncated, info = env.step(info["expert_action"])
            assert info["valid_action"]
            if terminated:
                break
        assert info["won"] and reward == 1.0 and terminated and not truncated, env.game_file
    assert seen_types == set(envs.ALFWORLD_TASK_TYPES)


def test_invalid_actions_are_answered_not_raised(alf_data):
    env = envs.make("alfworld", data_dir=alf_data, max_steps=3)
    env.reset(0)
    for action in ("fly to the moon", "", "<action>go to</action>", 12345):
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs == "Nothing happens." and not info["valid_action"] and reward == 0.0 and not terminated
    assert truncated  # the step cap turned the 3rd step into a truncation


def test_splits_and_task_type_filter(alf_data):
    for split in ("train", "valid_seen", "valid_unseen"):
        for f in envs.alfworld_game_files(alf_data, split):
            scene = json.load(open(os.path.join(os.path.dirname(f), "traj_data.json")))["scene"]["floor_plan"]
            assert (int(scene[len("FloorPlan"):]) % 100 > 25) == (split == "valid_unseen")
            assert f"/{split}/" in f
    env = envs.make("alfworld", data_dir=alf_data, task_types=["pick_two_obj_and_place", "look_at_obj_in_light"])
    assert len(env.game_files) == 2
    assert {env.reset(i)[1]["task_type"] for i in range(2)} == {"pick_two_obj_and_place", "look_at_obj_in_light"}


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"json_2\.1\.1/valid_seen.*alfworld-download"):
        envs.make("alfworld", split="valid_seen", data_dir=str(tmp_path))


def test_reset_reuses_cached_translation(alf_data):
    env = envs.make("alfworld", data_dir=alf_data)
    env.reset(1)
    before = envs._cached_pddl2sas.cache_info()
    env.reset(1)
    after = envs._cached_pddl2sas.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 2  # plain and optimised translation


def test_pool_matches_serial(alf_data):
    n, steps = 4, 5
    pool = envs.EnvPool("alfworld", n, workers=2, seed=3, data_dir=alf_data)
    serial = [envs.make("alfworld", seed=3 + i, data_dir=alf_data) for i in range(n)]
    try:
        got = pool.reset()
        want = [env.reset() for env in serial]
        assert [o for o, _ in got] == [o for o, _ in want]
        rngs = [random.Random(i) for i in range(n)]
        infos = [info for _, info in got]
        for t in range(steps):
            actions = [rngs[i].choice(infos[i]["admissible_actions"]) if i != t % n else None for i in range(n)]
            got = pool.step(actions)
            want = [None if a is None else env.step(a) for env, a in zip(serial, actions)]
            assert got == want
            infos = [g[4] if g is not None else infos[i] for i, g in enumerate(got)]
    finally:
        pool.close()


def test_pool_reports_worker_errors(tmp_path):
    with pytest.raises(RuntimeError, match="FileNotFoundError"):
        envs.EnvPool("alfworld", 2, workers=2, data_dir=str(tmp_path))


def webshop(split="train", seed=0):
    return envs.make("webshop", split=split, seed=seed, engine=FakeWebShop)


def test_webshop_right_purchase_scores_one_wrong_less():
    env = webshop(split="valid", seed=0)
    obs, info = env.reset(0)  # goal 0: the red cotton t-shirt, small, red, under $50
    assert "Instruction" not in obs and info["task"].startswith("i need a red cotton t-shirt")
    assert info["admissible_actions"] == ["search[<your query>]", "click[search]"]
    env.step("search[cotton t-shirt]")
    env.step("click[b0001]")
    env.step("click[small]")
    _, _, _, _, info = env.step("click[red]")
    assert "click[buy now]" in info["admissible_actions"]
    _, reward, terminated, _, info = env.step("click[buy now]")
    assert reward == 1.0 and terminated and info["won"]

    env.reset(0)
    env.step("search[t-shirt]")
    _, _, _, _, info = env.step("click[b0003]")  # wool, too expensive, no options chosen
    assert "'green wool t-shirt'" in env._format(env.engine._obs())
    _, reward, terminated, _, info = env.step("click[buy now]")
    assert terminated and reward < 1.0 and not info["won"]


def test_webshop_invalid_action_is_answered():
    env = webshop()
    env.reset()
    obs, reward, terminated, truncated, info = env.step("click[nothing here]")
    assert not info["valid_action"] and not terminated and reward == 0.0 and obs


def test_webshop_eval_and_train_goals_never_overlap():
    eval_goals = {webshop("valid", seed).reset()[1]["goal_index"] for seed in range(3)}
    assert eval_goals == {0}
    env = webshop("valid", seed=7)
    assert [env.reset()[1]["goal_index"] for _ in range(envs.WEBSHOP_N_EVAL_GOALS)] == list(range(500))
    train = set()
    for seed in range(8):  # any number of workers, any seeds
        env = webshop("train", seed)
        drawn = [env.reset()[1]["goal_index"] for _ in range(100)]
        assert len(set(drawn)) == 100  # without replacement
        train |= set(drawn)
    assert train.isdisjoint(range(envs.WEBSHOP_N_EVAL_GOALS)) and train <= set(range(500, 600))


def test_webshop_missing_checkout_explains_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("WEBSHOP_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="WEBSHOP_PATH.*setup.sh"):
        envs.make("webshop")
