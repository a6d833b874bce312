"""envs.py on the real ALFWorld engine with generated games, the pool, and WebShop against a fake engine."""
import json
import os
import random
import signal

import pytest

import envs
from tests.fake_webshop import FakeWebShop


OK = "<switch>SWITCH</switch><subgoal>find a mug</subgoal><action>go to cabinet 1</action>"
# (model output, expected (action sent to the env, valid, subgoal the next prompt shows)): the official rules (§2)
PARSE_TABLE = [
    (OK, ("go to cabinet 1", True, "find a mug")),
    ("<switch>KEEP</switch><subgoal>find a mug</subgoal><action>open cabinet 1</action>",
     ("open cabinet 1", True, "find a mug")),
    ("<switch> keep </switch><subgoal> find a mug </subgoal><action>look</action>", ("look", True, "find a mug")),
    ("<switch>switch</switch>\n<subgoal>heat it</subgoal>\n<action>heat mug 1 with microwave 1</action>",
     ("heat mug 1 with microwave 1", True, "heat it")),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><ACTION>  Take Apple 1 from Table 1 </Action>",
     ("take apple 1 from table 1", True, "a")),  # the action block is searched in the lower-cased text
    ("<switch>KEEP</switch><subgoal>a</subgoal><action>click[buy now]</action><|im_end|>", ("click[buy now]", True, "a")),
    ("<switch>SWITCH</switch><subgoal>find</subgoal><action>fly to mars</action>",  # not checked against admissible
     ("fly to mars", True, "find")),
    # duplicated tags and empty blocks are valid: the first block counts
    ("<switch>SWITCH</switch><switch>KEEP</switch><subgoal>a</subgoal><action>look</action>", ("look", True, "a")),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><subgoal>b</subgoal><action>look</action>", ("look", True, "a")),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action>look</action><action>inventory</action>",
     ("look", True, "a")),
    ("<switch>SWITCH</switch><subgoal></subgoal><action>look</action>", ("look", True, "")),
    ("<switch>SWITCH</switch><subgoal>   </subgoal><action>look</action>", ("look", True, "")),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action>  </action>", ("", True, "a")),
    # an action closer before its opener: both found, the content between them is empty
    ("<switch>KEEP</switch><subgoal>a</subgoal></action>look<action>", ("", True, "a")),
    # no action block: the env gets the last 30 characters of the lower-cased text, nothing else is checked
    ("<switch>SWITCH</switch><subgoal>Find a Mug</subgoal>go to cabinet 1",
     ("find a mug</subgoal>go to cabinet 1"[-30:], False, "")),
    ("I will go to the fridge now", ("i will go to the fridge now", False, "")),
    ("", ("", False, "")),
    ("<action>go to desk 1", ("<action>go to desk 1", False, "")),
    ("go to desk 1</action>", ("go to desk 1</action>", False, "")),
    ("<switch>SWITCH</switch><subgoal>找杯子</subgoal>", ("<switch>switch</switch><subgoal>找杯子</subgoal>"[-30:], False, "")),
    # switch tags missing (case-sensitive): invalid; the next subgoal is the action's last 30 characters
    ("<subgoal>find a mug</subgoal><action>look</action>", ("look", False, "look")),
    ("<SWITCH>SWITCH</SWITCH><subgoal>x y</subgoal><action>Go To Fridge 1</action>",
     ("go to fridge 1", False, "go to fridge 1")),
    ("<action>take the small blue ceramic mug 1 from the top shelf 3</action>",
     ("take the small blue ceramic mug 1 from the top shelf 3", False, "ceramic mug 1 from the top shelf 3"[-30:])),
    # a switch word other than KEEP or SWITCH: invalid, next subgoal ""
    ("<switch>MAYBE</switch><subgoal>a</subgoal><action>look</action>", ("look", False, "")),
    ("<switch></switch><subgoal>a</subgoal><action>look</action>", ("look", False, "")),
    ("<switch>KEEP SWITCH</switch><subgoal>a</subgoal><action>look</action>", ("look", False, "")),
    ("</switch>SWITCH<switch><subgoal>a</subgoal><action>look</action>", ("look", False, "")),  # closer first
    # subgoal tags missing (case-sensitive) after a good switch word: invalid, next subgoal ""
    ("<switch>SWITCH</switch><action>look</action>", ("look", False, "")),
    ("<switch>KEEP</switch><SUBGOAL>a</SUBGOAL><action>look</action>", ("look", False, "")),
    ("<switch>SWITCH</switch><subgoal>a<action>look</action>", ("look", False, "")),
    # CJK anywhere: invalid, the subgoal still carries over
    ("<switch>SWITCH</switch><subgoal>找杯子</subgoal><action>look</action>", ("look", False, "找杯子")),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action>look 看</action>", ("look 看", False, "a")),
]


@pytest.mark.parametrize("text,expected", PARSE_TABLE)
def test_parse_table(text, expected):
    assert envs.parse_response(text, "alfworld") == expected


def test_parse_webshop_fallbacks():
    """WebShop: the last 20 characters without an action block; the literal "None" as the next subgoal when the
    switch tags are missing."""
    assert envs.parse_response("x" * 50 + "click[buy]", "webshop") == (("x" * 50 + "click[buy]")[-20:], False, "")
    assert envs.parse_response("<subgoal>a</subgoal><action>click[buy now]</action>", "webshop") == \
        ("click[buy now]", False, "None")


@pytest.mark.parametrize("text,boundary", [
    (OK, True), ("<switch>KEEP</switch><subgoal>a</subgoal>", False), ("<switch> keep </switch>", False),
    ("no tags at all", False), ("<switch></switch>", False), ("<switch>MAYBE</switch>", True),  # asymmetry (§2)
    ("<switch>SWITCH</switch><switch>KEEP</switch>", True), ("<switch>KEEP</switch><switch>SWITCH</switch>", False),
    ("<SWITCH>SWITCH</SWITCH>", False), ("<Switch>switch</Switch><switch>keep</switch>", False),  # case-sensitive tags
])
def test_boundary_parse(text, boundary):
    assert envs.is_boundary(text) == boundary



def test_invalid_actions_are_answered_not_raised(alf_data):
    env = envs.make("alfworld", data_dir=alf_data, max_steps=10)
    env.reset(0)
    for action in ("fly to the moon", "", "<action>go to</action>", 12345):
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs == "Nothing happens." and reward == 0.0
        assert not terminated and not truncated


def test_step_limit_is_a_terminal_time_out(alf_data):
    """TextWorld's step limit ends the episode as done, never as truncated (the official runs, §11)."""
    env = envs.make("alfworld", data_dir=alf_data, max_steps=3)
    env.reset(0)
    outs = [env.step("look") for _ in range(3)]
    assert [o[2] for o in outs] == [False, False, True] and not any(o[3] for o in outs) and not outs[-1][4]["won"]


def test_alfworld_prompt_layout_on_a_real_game(alf_data):
    """§10 layout: first turn = role, subgoal rules, the raw first observation (TextWorld's banner included),
    subgoal None, admissible actions (quoted, `help` dropped, newline + space between), format rules; later turns
    add the task to the role line and the step count with the last records, one per line, and no step line."""
    env = envs.make("alfworld", data_dir=alf_data)
    obs0, info = env.reset(0)
    p0 = envs.alfworld_prompt(info["task"], obs0, [], 0, "None", info["admissible_actions"])
    assert obs0.startswith("-= Welcome to TextWorld, ALFRED! =-") and f"Current observation: {obs0}\n" in p0
    actions = "[" + "\n ".join(f"'{a}'" for a in info["admissible_actions"] if a != "help") + "]"
    assert "'help'" not in p0 and f"Admissible actions: {actions}\n" in p0
    order = [p0.index(x) for x in (envs.SUBGOAL_RULES, "Current observation:", "Current subgoal: None\n",
                                    "Admissible actions:", envs.FORMAT_RULES)]
    assert order == sorted(order) and "The task:" not in p0 and p0.endswith(envs.FORMAT_RULES)
    history = [(obs0, "look")]
    obs1, *_, info = env.step("look")
    history.append((obs1, "inventory"))
    obs2, *_, info = env.step("inventory")
    p2 = envs.alfworld_prompt(info["task"], obs2, history, 2, "find it", info["admissible_actions"])
    first_line = p2.split("\n")[0]
    assert first_line.endswith(f"The task: {info['task']}.") and "step 3" not in p2.lower()
    records = f"[Observation 1: '{obs0}', Action 1: 'look']\n[Observation 2: '{obs1}', Action 2: 'inventory']"
    assert f"2 step(s) taken so far; the last 2 observation(s), each with the action taken after it:\n{records}\n" \
        f"Current observation: {obs2}\nCurrent subgoal: find it\nAdmissible actions: [" in p2


def test_webshop_prompt_layout():
    """WebShop: the task in both templates, a step line on later turns, actions one per line each followed by a
    comma, the page's pieces after the instruction single-quoted and joined by ' [SEP] '."""
    env = webshop("valid")
    obs0, info = env.reset(0)
    assert obs0 == "'Search'"
    p0 = envs.webshop_prompt(info["task"], obs0, [], 0, "None", info["admissible_actions"])
    assert f"The task: {info['task']}." in p0 and "This is step" not in p0
    assert "Admissible actions: [\n'search[<your query>]',\n'click[search]',\n]\n" in p0
    obs1, *_, info = env.step("search[cotton]")
    assert obs1 == "'Back to Search' [SEP] 'b0001' [SEP] 'red cotton t-shirt' [SEP] '$12.0'"
    p1 = envs.webshop_prompt(info["task"], obs1, [(obs0, "search[cotton]")], 1, "find it",
                             info["admissible_actions"])
    assert f"The task: {info['task']}." in p1 and f"This is step 2. Current observation: {obs1}\n" in p1
    assert "[Observation 1: ''Search'', Action 1: 'search[cotton]']\n" in p1
    long = envs.webshop_prompt(info["task"], "x" * 12000, [("y" * 2000, "a")], 1, "s", [])  # over 13,000 characters
    assert "x" * 12000 in long and "y" * 2000 not in long and "This is step" not in long  # the history-free template


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
    from textworld.envs.pddl import logic
    env = envs.make("alfworld", data_dir=alf_data)
    env.reset(1)
    cache = logic.fast_downward.pddl2sas
    before = cache.cache_info()
    env.reset(1)
    after = cache.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 2  # plain and optimised translation
    assert after.maxsize == envs.SAS_CACHE  # bounded: least recently used translations go first


def test_one_engine_loads_each_game_and_memory_stays_flat(alf_data):
    """A game loaded into the env's one engine plays as in a fresh env; 36 more resets over 6 games, each a new
    load, leave the process RSS within 10 MB (an engine per game grew it ~1.7 MB per load: ~60 MB here)."""
    rss = lambda: int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS")).split()[1]) / 1024  # noqa
    env = envs.make("alfworld", data_dir=alf_data)
    fresh = [envs.make("alfworld", data_dir=alf_data).reset(g)[0] for g in range(3)]
    assert [env.reset(g)[0] for g in (0, 1, 2)] == fresh
    for g in range(6):
        env.reset(g)
    before = rss()
    for k in range(36):
        env.reset(k % 6)
    assert rss() - before < 10


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


def test_pool_workers_come_from_a_forkserver_and_their_death_is_reported(alf_data):
    """Workers are not forked from this process (which may hold CUDA or vLLM threads) but from a clean server;
    a worker killed mid-run is reported, not waited for."""
    pool = envs.EnvPool("alfworld", 2, workers=2, data_dir=alf_data)
    try:
        parents = [int(open(f"/proc/{p.pid}/stat").read().split(")")[1].split()[1]) for p in pool.procs]
        assert os.getpid() not in parents and len(set(parents)) == 1
        pool.reset()
        os.kill(pool.procs[1].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="env worker 1 died"):
            pool.step(["look", "look"])
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
    assert not terminated and reward == 0.0 and obs


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
