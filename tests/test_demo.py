"""demo.py, the offline kit: generated games in the released layout, walkthrough stages and search, walkthroughs
replayed on the real engine, and the supervised warm start."""
import argparse
import json
import os

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

import demo
import envs
import hiper


def test_generated_layout_matches_release(alf_data):
    files = envs.alfworld_game_files(alf_data, "train")
    assert len(files) == 6
    for f in files:
        game = json.load(open(f))
        assert set(game) >= {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
        assert game["solvable"] and "UNKNOWN GOAL" not in game["grammar"]
        traj = json.load(open(os.path.join(os.path.dirname(f), "traj_data.json")))
        assert set(traj["pddl_params"]) == {"object_target", "parent_target", "toggle_target", "mrecep_target",
                                            "object_sliced"}
        assert os.path.basename(os.path.dirname(os.path.dirname(f))).startswith(traj["task_type"])


@pytest.mark.parametrize("split", ["train", "valid_seen", "valid_unseen"])
def test_planner_wins_every_generated_game_on_the_real_engine(alf_data, split):
    env = demo.planner_env(split, alf_data)
    seen_types = set()
    for gi in range(len(env.game_files)):
        obs, info = env.reset(gi)
        assert info["task"] and info["task"] in obs and "help" in info["admissible_actions"]
        seen_types.add(info["task_type"])
        for _ in range(30):
            action = env.state["policy_commands"][0]
            assert action in info["admissible_actions"]
            obs, reward, terminated, truncated, info = env.step(action)
            if terminated:
                break
        assert info["won"] and reward == 1.0 and terminated and not truncated, env.game_file
    assert seen_types == set(envs.ALFWORLD_TASK_TYPES)


@pytest.mark.parametrize("action, subgoal", [
    ("take apple 1 from countertop 2", "find and take the apple"),
    ("clean butterknife 1 with sinkbasin 1", "clean the butterknife with the sinkbasin"),
    ("heat bread 1 with microwave 1", "heat the bread with the microwave"),
    ("cool bread 1 with fridge 1", "cool the bread with the fridge"),
    ("use desklamp 1", "turn on the desklamp"),
    ("move cellphone 2 to shelf 1", "put the cellphone in the shelf"),
])
def test_stage_subgoals(action, subgoal):
    assert demo._stage_subgoal(action) == subgoal


def test_search_opens_then_walks_the_order_round():
    admissible = ["go to cabinet 1", "go to drawer 1", "go to fridge 1", "help", "inventory", "look"]  # at desk 1
    order = ["cabinet 1", "desk 1", "drawer 1", "fridge 1"]
    assert demo._search(admissible, None, order) == "go to cabinet 1"  # nowhere yet: the first receptacle
    assert demo._search(admissible + ["open desk 1"], "desk 1", order) == "open desk 1"  # closed: look inside first
    assert demo._search(admissible, "desk 1", order) == "go to drawer 1"  # the next one in the order
    assert demo._search(admissible, "fridge 1", order) == "go to cabinet 1"  # past the last: wrap around
    assert demo._search(admissible, "desk 1", order[::-1]) == "go to cabinet 1"  # another order, another next


def test_plan_execute_demos_replay_and_follow_the_format(alf_data):
    """Every demo's actions, sent to the real engine, win the game; every response parses valid; SWITCH
    exactly where the stage subgoal changes, KEEP copies it; prompts show the previous turn's subgoal. The
    first stage searches: it visits receptacles in the listed order, not straight where the planner knows."""
    demos = demo.plan_execute_demos(alf_data, "train")
    assert len(demos) == 6
    env = envs.ALFWorldEnv("train", data_dir=alf_data)
    for g, pairs in enumerate(demos):
        _, info = env.reset(g)
        parsed = [envs.parse_response(r) for _, r in pairs]  # (action, valid, subgoal)
        assert all(valid for _, valid, _ in parsed)
        end = next(t for t, (a, _, _) in enumerate(parsed) if a.split(" ")[0] in demo.STAGE_END)
        first = [a[6:] for a, _, _ in parsed[:end] if a.startswith("go to ")]
        listed = [a[6:] for a in info["admissible_actions"] if a.startswith("go to ")]
        assert first == listed[:len(first)]
        for t, ((action, _, subgoal), (prompt, response)) in enumerate(zip(parsed, pairs)):
            previous = parsed[t - 1][2] if t else "None"
            assert f"Current subgoal: {previous}\n" in prompt
            assert envs.is_boundary(response) == (t == 0 or subgoal != previous)
            assert f"'{action}'" in prompt  # admissible, listed in the prompt
            *_, info = env.step(action)
        assert info["won"] and parsed[-1][0].split()[0] in demo.STAGE_END


def test_a_dithering_demonstrator_says_look_as_often_as_asked_and_otherwise_walks_the_same(alf_data):
    """With `dither` q the demonstrator says `look` before an action with probability q at every turn, keeping its
    subgoal: without its looks each walkthrough is the plain one (a look changes nothing in the game), every
    response parses valid, a look that opens a stage is followed by KEEP, and the share of looks is near q."""
    plain = demo.plan_execute_demos(alf_data, "train", history=1)
    dithered = demo.plan_execute_demos(alf_data, "train", history=1, dither=0.5, seed=3)
    actions = lambda pairs: [envs.parse_response(r)[0] for _, r in pairs]  # noqa: E731
    looks = 0
    for p, d in zip(plain, dithered):
        assert [a for a in actions(d) if a != "look"] == actions(p) and "look" not in actions(p)
        assert all(envs.parse_response(r)[1] for _, r in d)
        for t, (action, (_, response)) in enumerate(zip(actions(d), d)):
            if action == "look" and t:
                assert "<switch>KEEP</switch>" in response or d[t + 1][1].startswith("<switch>KEEP")
        looks += actions(d).count("look")
    turns = sum(len(d) for d in dithered)
    assert 0.35 < looks / turns < 0.65


def test_warm_start_imitates_the_demonstrations(tmp_path):
    """Supervised warm start on two plan-execute turns: greedy generation then reproduces each response."""
    demos = [[("Task: find a mug. Actions: ['go to cabinet 1', 'go to desk 1']",
               "<switch>SWITCH</switch><subgoal>find and take the mug</subgoal><action>go to desk 1</action>"),
              ("Task: find a mug. You see a mug 2. Actions: ['take mug 2 from desk 1', 'go to cabinet 1']",
               "<switch>KEEP</switch><subgoal>find and take the mug</subgoal><action>take mug 2 from desk 1</action>")]]
    path = str(tmp_path / "tiny")
    demo.build_tiny(path, [p + r for p, r in demos[0]] * 5)
    tok, policy, _, _ = hiper.load_models(path, path)
    prompts = [p for p, _ in demos[0]]
    before = [tok.decode(r, skip_special_tokens=True) for _, r, _ in hiper.generate(policy, tok, prompts, 40, 0.0)]
    demo.warm_start(policy, tok, demos, epochs=60, lr=3e-3, batch=2, seed=6)
    after = [tok.decode(r, skip_special_tokens=True) for _, r, _ in hiper.generate(policy, tok, prompts, 40, 0.0)]
    assert after == [r for _, r in demos[0]] and before != after


def test_warm_start_learning_rate_falls_linearly_to_zero(tmp_path):
    """3 turns in batches of 2 for 3 epochs = 6 steps; step k runs at sft_lr·(1 − k/6), the last one above 0."""
    demos = [[(f"Task: find a mug. Step {k}.", "<switch>KEEP</switch><subgoal>find</subgoal><action>look</action>")
              for k in range(3)]]
    path = str(tmp_path / "tiny")
    demo.build_tiny(path, [p + r for p, r in demos[0]] * 5)
    tok, policy, _, _ = hiper.load_models(path, path)
    lrs = []
    hook = register_optimizer_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    try:
        demo.warm_start(policy, tok, demos, epochs=3, lr=1e-3, batch=2, seed=6)
    finally:
        hook.remove()
    assert lrs == pytest.approx([1e-3 * (1 - k / 6) for k in range(6)])


def test_a_kit_built_with_other_settings_is_rebuilt_and_other_games_stop_the_run(tmp_path, capsys):
    """demo.py skips a warm start built with the same settings, rebuilds one built with others (reported), and
    stops on a data folder generated with other game settings instead of reusing or overwriting it."""
    run = str(tmp_path / "kit")
    args = ["--env", "demo:Fixed", "--run_dir", run, "--episodes", "8", "--sft_epochs", "1"]
    demo.main(args)
    warm = os.path.join(run, "warm-start", "model.safetensors")
    first = os.path.getmtime(warm)
    demo.main(args)
    assert os.path.getmtime(warm) == first and "rebuilding" not in capsys.readouterr().out
    demo.main(args[:-1] + ["2"])
    assert os.path.getmtime(warm) > first and "built with other settings" in capsys.readouterr().out
    with open(os.path.join(run, "kit.json")) as f:
        assert json.load(f)["sft_epochs"] == 2
    second = os.path.getmtime(warm)
    os.remove(os.path.join(run, "kit.json"))  # a warm start from before the record: rebuilt, not trusted
    demo.main(args[:-1] + ["2"])
    assert os.path.getmtime(warm) > second and os.path.exists(os.path.join(run, "kit.json"))
    data = tmp_path / "games"
    data.mkdir()
    (data / "generated").write_text(json.dumps(dict(train_games=3, eval_games=1, max_receptacles=5, n_distractors=0)))
    with pytest.raises(SystemExit, match="generated with"):
        demo.main(["--data_dir", str(data), "--games_only"])


def test_the_warm_starts_games_are_not_rls(tmp_path):
    """demo.py's games: the warm start's own (<data_dir>/sft) and RL's training games are different games, the
    held-out splits are the ones seed 0 always draws, and every game is in ALFWorld's released layout."""
    data = str(tmp_path / "games")
    a = argparse.Namespace(data_dir=data, sft_games=1, train_games=1, eval_games=1, max_receptacles=5, n_distractors=0)
    demo.games(a)
    sft = envs.alfworld_game_files(os.path.join(data, "sft"), "train")
    train = envs.alfworld_game_files(data, "train")
    problems = lambda files: {json.load(open(f))["pddl_problem"] for f in files}  # noqa: E731
    assert len(sft) == len(train) == 6 and not problems(sft) & problems(train)
    again = str(tmp_path / "again")
    for split in ("valid_seen", "valid_unseen"):
        demo.generate_alfworld_games(again, 1, 0, split, max_receptacles=5, n_distractors=0)
        assert problems(envs.alfworld_game_files(data, split)) == problems(envs.alfworld_game_files(again, split))


def test_ladder_tasks_follow_their_rules():
    """The ladder's envs: the right button switches the current light off and opens the next, a wrong one answers
    "Nothing happens.", won only when the last is off, done then or at the step limit; Fixed's answer is always
    blue and unnamed, Read and Stages name it; held-out draws differ from training draws."""
    env = envs.make("demo:Stages", seed=0)
    obs, info = env.reset(3)
    assert info["admissible_actions"] == [f"press {c}" for c in demo.COLOURS] and not info["won"]
    colours = list(env.colours)
    assert f"Light 1 of 3 is {colours[0]}." in obs and "Your task is to:" in obs
    wrong = next(c for c in demo.COLOURS if c != colours[0])
    obs, r, done, trunc, info = env.step(f"press {wrong}")
    assert obs.startswith("Nothing happens.") and (r, done, trunc, info["won"]) == (0.0, False, False, False)
    for k, c in enumerate(colours):
        obs, r, done, _, info = env.step(f"press {c}")
        assert f"Light {k + 1} is off." in obs and done == (k == 2) and info["won"] == (k == 2) and r == (k == 2)
    env.reset(3)
    steps = [env.step("press nothing")[2] for _ in range(6)]
    assert steps == [False] * 5 + [True]  # the step limit ends the episode, lost
    fixed = envs.make("demo:Fixed")
    obs, _ = fixed.reset(0)
    assert fixed.colours == ["blue"] and "blue" not in obs and fixed.step("press blue")[2]
    train = [tuple((e := envs.make("demo:Stages")).reset(g) and e.colours) for g in range(64)]
    test = [tuple((e := envs.make("demo:Stages", split="test")).reset(g) and e.colours) for g in range(64)]
    assert train != test and len(set(test)) > 20 and demo.Stages.n_games(None, "test") == 64


def test_the_long_rung_is_eight_stages_in_fourteen_steps():
    """Rung d: eight named lights; reading every light wins in eight presses with one reward at the end; a
    demonstrator that reads 40 % of the time wins about P(Bin(14, 0.55) ≥ 8) = 0.55 of its episodes."""
    env = envs.make("demo:Long", seed=0)
    obs, _ = env.reset(5)
    assert "Light 1 of 8 is" in obs and env.max_steps == 14
    rewards = [env.step(f"press {c}")[1] for c in list(env.colours)]
    assert rewards == [0.0] * 7 + [1.0]

    def won(ep):  # the episode ends early only when won; at step 14, won if that press was light 8's colour
        prompt, response = ep[-1]
        return len(ep) < 14 or any(f"Light 8 of 8 is {c}." in prompt and f"press {c}<" in response
                                   for c in demo.COLOURS)
    assert 0.45 < sum(map(won, demo.ladder_demos("demo:Long", 400, 0.4, seed=1))) / 400 < 0.65


def test_the_reworded_long_rung_shares_no_token_between_subgoal_and_tags(tmp_path):
    """Rung e is rung d with `turn off light k` for `switch off light k`: in a tokenizer built from each rung's own
    demonstrations, rung d's subgoal shares the token of `<switch>`'s name and rung e's shares none of the tags'."""
    from transformers import AutoTokenizer
    shared = {}
    for rung in ("Long", "Turn"):
        demos = demo.ladder_demos(f"demo:{rung}", 30, 0.4, seed=0)
        demo.build_tiny(tmp_path / rung, [p + r for ep in demos for p, r in ep])
        tok, response = AutoTokenizer.from_pretrained(tmp_path / rung), demos[0][0][1]
        action, valid, subgoal = envs.parse_response(response)
        tags = response.replace(subgoal, "").replace(action, "")
        assert valid and "<subgoal></subgoal>" in tags and "<action></action>" in tags
        shared[rung] = set(tok.tokenize(subgoal)) & set(tok.tokenize(tags))
        assert envs.make(f"demo:{rung}").task.startswith(subgoal.split()[0])
    assert "switch" in shared["Long"] and shared["Turn"] == set(), shared


def test_ladder_demonstrations_read_as_often_as_asked():
    """A demonstrator that always reads wins every episode in one press per light, SWITCHing at each new light
    and never KEEPing; one that never reads presses at random and KEEPs while it retries a light."""
    reads = demo.ladder_demos("demo:Stages", 20, 1.0)
    assert all(len(ep) == 3 for ep in reads)
    assert all(r.startswith("<switch>SWITCH</switch>") for ep in reads for _, r in ep)
    random_ = demo.ladder_demos("demo:Stages", 40, 0.0)
    keeps = [r for ep in random_ for _, r in ep if r.startswith("<switch>KEEP</switch>")]
    assert keeps and all(envs.parse_response(r)[1] for ep in random_ for _, r in ep)
    prompt, response = reads[0][1]
    assert "Current subgoal: switch off light 1" in prompt and "switch off light 2" in response
