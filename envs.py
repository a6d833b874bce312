"""Environments for HiPER: the plan-execute parser and prompts, ALFWorld (real engine) and WebShop adapters,
and a process pool. Every env is gymnasium-style:

    env = make("alfworld", split="train", seed=0)
    obs, info = env.reset()
    obs, reward, terminated, truncated, info = env.step("go to fridge 1")

`info` always holds: task, task_type, admissible_actions, won.
"""
import functools
import glob
import importlib
import json
import multiprocessing as mp
import os
import random
import re
import sys
import traceback

ALFWORLD_TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
                       "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
ALFWORLD_SPLITS = ("train", "valid_seen", "valid_unseen")  # train, in-distribution, out-of-distribution
WEBSHOP_N_EVAL_GOALS = 500  # goal indices 0–499 are held out for evaluation (§11)
SAS_CACHE = 64  # PDDL→SAS translations a process keeps (least recently used out; README)


def env_class(name):
    """The class of an environment: "alfworld", "webshop", or "module:Class" for one of your own with the same
    interface (reset/step, the info keys above, `prompt`, `eval_splits`, `n_games`), e.g. demo.py's ladder tasks."""
    if ":" in name:
        module, _, cls = name.partition(":")
        return getattr(importlib.import_module(module), cls)
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}: expected one of {tuple(ENVS)} or module:Class")
    return ENVS[name]


def make(name, split="train", seed=0, **options):
    """Build one environment by name (see env_class)."""
    return env_class(name)(split=split, seed=seed, **options)


# ---- plan-execute output: parsing (§2) and prompts (§10) ----

CJK = re.compile("[\u4e00-\u9fff]")
FORMAT_RULES = """Your response must be exactly three blocks, in this order, and nothing else:
1. <switch>KEEP</switch> or <switch>SWITCH</switch>: KEEP the current subgoal, or SWITCH to a new one.
2. <subgoal>...</subgoal>: every step. On KEEP copy the current subgoal verbatim; on SWITCH write a new short \
subgoal that takes a few actions (not the whole task, not a single action).
3. <action>...</action>: exactly one admissible action, copied as it is.
<switch>...</switch>
<subgoal>...</subgoal>
<action>...</action>"""
SUBGOAL_RULES = ("A subgoal is a small short-term goal that takes a few actions. Reconsider it at every step: "
                 "keep it while it is still useful, switch to a new one when it is done or no longer helps.")


def _block(text, tag):
    """The stripped text between the first <tag> and the first </tag> (empty if the closer comes first), or None
    if either is missing. Case-sensitive: the official parse searches <switch> and <subgoal> in the raw text."""
    a, b = text.find(f"<{tag}>"), text.find(f"</{tag}>")
    return None if -1 in (a, b) else text[a + len(tag) + 2:b].strip()


def parse_response(text, env_name="alfworld"):
    """Environment-side parse, the official rules (§2): (action for the env, valid, subgoal for the next prompt).
    Malformed output is an invalid turn, never an error. The action is the lower-cased <action> block; without
    one the env gets the last 30 (ALFWorld) / 20 (WebShop) characters, and nothing else is checked. Otherwise the
    turn is invalid without a <switch> block, with a word other than KEEP or SWITCH, without a <subgoal> block, or
    with a CJK character. Duplicated tags and empty blocks are valid."""
    action = _block(text.lower(), "action")
    if action is None:
        return text.lower()[-(30 if env_name == "alfworld" else 20):], False, ""
    switch, subgoal = _block(text, "switch"), _block(text, "subgoal")
    if switch is None:  # the official next-prompt subgoal without switch tags
        return action, False, action[-30:] if env_name == "alfworld" else "None"
    good = switch.upper() in ("KEEP", "SWITCH")
    valid = good and subgoal is not None and not CJK.search(text)
    return action, valid, subgoal if good and subgoal is not None else ""


def is_boundary(text):
    """Trainer-side boundary parse (§2): the first <switch> block (case-sensitive), stripped and upper-cased;
    missing or empty means KEEP; anything but exactly KEEP opens a segment."""
    m = re.search(r"<switch>(.*?)</switch>", text, re.S)
    return (m.group(1).strip().upper() if m else "") not in ("", "KEEP")


def _records(history, step):
    """§10: the step count, then the last k (observation, action) records, one `[Observation i: '…', Action i:
    '…']` per line."""
    first = step - len(history) + 1
    return "\n".join([f"{step} step(s) taken so far; the last {len(history)} observation(s), each with the action "
                      "taken after it:"] + [f"[Observation {first + i}: '{o}', Action {first + i}: '{a}']"
                                            for i, (o, a) in enumerate(history)])


def alfworld_prompt(task, obs, history, step, subgoal, admissible):
    """§10: role (and, after the first turn, the task), subgoal explanation, (later turns) step count and last
    records, observation (the first one with TextWorld's banner), current subgoal, admissible actions, format."""
    actions = "[" + "\n ".join(f"'{a}'" for a in admissible if a != "help") + "]"
    role = "You are an expert agent acting in ALFRED, a text-only household environment."
    head = f"{role}\n{SUBGOAL_RULES}"  # the first observation states the task
    if step:
        head = f"{role} The task: {task}.\n{SUBGOAL_RULES}\n{_records(history, step)}"
    return (f"{head}\nCurrent observation: {obs}\nCurrent subgoal: {subgoal}\nAdmissible actions: {actions}\n\n"
            f"{FORMAT_RULES}")


def webshop_prompt(task, obs, history, step, subgoal, admissible, max_chars=13000):
    """§10: as ALFWorld, with the task in both templates, a step line on later turns, actions one per line
    (each followed by a comma); over max_chars the history-free template is used."""
    actions = "[\n" + "".join(f"'{a}',\n" for a in admissible) + "]"
    head = f"You are an expert agent shopping in WebShop, a text-only online store. The task: {task}.\n{SUBGOAL_RULES}"
    tail = f"Current subgoal: {subgoal}\nAdmissible actions: {actions}\n\n{FORMAT_RULES}"
    full = f"{head}\n{_records(history, step)}\nThis is step {step + 1}. Current observation: {obs}\n{tail}"
    return full if step and len(full) <= max_chars else f"{head}\nCurrent observation: {obs}\n{tail}"


# ---- ALFWorld ----

def _install_sas_cache():
    """fast_downward.pddl2sas is ~90 % of a reset and repeats for an unchanged problem: an LRU cache in front."""
    from textworld.envs.pddl import logic
    if not hasattr(logic.fast_downward.pddl2sas, "cache_info"):
        logic.fast_downward.pddl2sas = functools.lru_cache(maxsize=SAS_CACHE)(logic.fast_downward.pddl2sas)


def alfworld_game_files(data_dir, split, task_types=ALFWORLD_TASK_TYPES):
    """The solvable games of a split, laid out as `alfworld-download` does: <data_dir>/json_2.1.1/<split>/...
    An empty data_dir means $ALFWORLD_DATA (default ~/.cache/alfworld, alfworld-download's own default)."""
    if split not in ALFWORLD_SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}: expected one of {ALFWORLD_SPLITS}")
    data_dir = os.path.expanduser(data_dir or os.environ.get("ALFWORLD_DATA", "~/.cache/alfworld"))
    root = os.path.join(data_dir, "json_2.1.1", split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ALFWorld data not found: looked for {root}. Get the released games with "
                                f"`pip install alfworld && ALFWORLD_DATA={data_dir} alfworld-download`, or generate "
                                f"offline ones with `python demo.py --games_only --data_dir {data_dir}`.")
    files = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "traj_data.json"))):
        game_dir = os.path.dirname(path)
        if "movable" in game_dir or "Sliced" in game_dir:  # skipped by ALFWorld too
            continue
        with open(path) as f:
            if json.load(f)["task_type"] not in task_types:
                continue
        game = os.path.join(game_dir, "game.tw-pddl")
        if os.path.exists(game):
            with open(game) as f:
                if json.load(f).get("solvable"):
                    files.append(game)
    if not files:
        raise FileNotFoundError(f"no solvable ALFWorld games of types {task_types} under {root}")
    return files


class ALFWorldEnv:
    """One ALFWorld text game at a time, through the real alfworld/TextWorld PDDL engine. Train split: games drawn
    at random (seeded); evaluation splits: in a fixed order, each once per `len(env.game_files)` resets. Reward is
    the engine's 1.0 on success (10·won in hiper.py, §8). `terminated` on success and at `max_steps`, TextWorld's
    own limit (a terminal time-out, as in the official runs, §11); never `truncated`: a shorter rollout cap
    truncates. One engine loads each new game: an engine per game maps a copy of Fast Downward's library that is
    never unloaded (~1.9 MB per reset, results/README.md)."""

    prompt = staticmethod(alfworld_prompt)
    eval_splits = ("valid_seen", "valid_unseen")  # in-distribution, out-of-distribution

    @staticmethod
    def n_games(data_dir, split):
        """Games in a split: training draws from them (GRPO groups share one), validation plays each."""
        return len(alfworld_game_files(data_dir, split))

    def __init__(self, split="train", seed=0, data_dir=None, task_types=ALFWORLD_TASK_TYPES, max_steps=50):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        from textworld.envs.pddl import PddlEnv
        _install_sas_cache()
        self.game_files = alfworld_game_files(data_dir, split, tuple(task_types))
        self.split, self.max_steps = split, max_steps
        self.rng = random.Random(seed)
        self.next_game, self.game_file = 0, None
        self.infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        self.env = AlfredInfos(AlfredDemangler(PddlEnv(self.infos)))  # what textworld.start builds, before loading

    def reset(self, game_index=None):
        if game_index is None and self.split == "train":
            game_index = self.rng.randrange(len(self.game_files))
        elif game_index is None:
            game_index, self.next_game = self.next_game, (self.next_game + 1) % len(self.game_files)
        if self.game_files[game_index] != self.game_file:
            self.game_file = self.game_files[game_index]
            self.env.load(self.game_file)
        state = self.env.reset()
        obs = state["feedback"]  # TextWorld's welcome banner included, as in the official prompts (§10)
        with open(os.path.join(os.path.dirname(self.game_file), "traj_data.json")) as f:
            self.task_type = json.load(f)["task_type"]
        self.task = obs.partition("Your task is to: ")[2].strip().rstrip(".")
        self.steps = 0
        return obs, self._info(state)

    def step(self, action):
        state, _, _ = self.env.step(str(action).strip())  # anything not admissible answers "Nothing happens."
        self.steps += 1
        won = bool(state["won"])
        return state["feedback"], float(won), won or self.steps >= self.max_steps, False, self._info(state)

    def _info(self, state):
        self.state = state
        return dict(task=self.task, task_type=self.task_type, admissible_actions=list(state["admissible_commands"]),
                    won=bool(state["won"]), gamefile=self.game_file)


# ---- WebShop ----

def _webshop_engine(data_dir=None, **kwargs):
    """WebShop's own text environment, from the checkout at data_dir (empty: $WEBSHOP_PATH)."""
    path = data_dir or os.environ.get("WEBSHOP_PATH")
    if not path or not os.path.isdir(os.path.join(path, "web_agent_site")):
        raise FileNotFoundError(
            f"WebShop not found: {path!r} (--data_dir or WEBSHOP_PATH) must be a checkout of the official WebShop "
            "repository (princeton-nlp/WebShop) with its data and search index set up by its `setup.sh -d small` "
            "(the 1,000-product catalogue and its pyserini index; needs Java and spaCy's en_core_web_sm).")
    sys.path.insert(0, path)
    from web_agent_site.envs import WebAgentTextEnv
    return WebAgentTextEnv(observation_mode="text", human_goals=False, **kwargs)  # synthetic goals, as officially (§11)


class WebShopEnv:
    """WebShop in text mode (§10, §11), on its synthetic goals. Goals 0–499 of the engine's (fixed, seeded)
    goal list are the evaluation set, visited in order; training draws the other goals without replacement
    (seeded), so the two never overlap whatever the seeds or number of workers (the official scripts shuffle
    the list per worker, so theirs do). Reward is the engine's score in [0, 1]; won ⇔ score = 1. No step
    limit of its own (never `truncated`): the rollout cap truncates."""

    prompt = staticmethod(webshop_prompt)
    eval_splits = ("test",)

    @staticmethod
    def n_games(data_dir, split):
        """Goals 0–499 are evaluated in order; training goals are the engine's own draw (None)."""
        return None if split == "train" else WEBSHOP_N_EVAL_GOALS

    def __init__(self, split="train", seed=0, data_dir=None, engine=None, **engine_kwargs):
        self.engine = engine(**engine_kwargs) if engine else _webshop_engine(data_dir, **engine_kwargs)
        n = len(self.engine.server.goals)
        if split == "train":  # the goals after 0–499, drawn without replacement in a seeded order
            self.goals = list(range(WEBSHOP_N_EVAL_GOALS, n))
            random.Random(seed).shuffle(self.goals)
        else:  # goals 0–499, in order
            self.goals = list(range(min(WEBSHOP_N_EVAL_GOALS, n)))
        self.next_goal = 0

    def reset(self, goal_index=None):
        if goal_index is None:
            goal_index, self.next_goal = self.goals[self.next_goal], (self.next_goal + 1) % len(self.goals)
        self.goal_index = goal_index
        obs, _ = self.engine.reset(session=goal_index)
        pieces = [p.strip() for p in self.engine.get_instruction_text().split("[SEP]")]
        self.task = " ".join(p for p in pieces if p and p != "Instruction:")
        return self._format(obs), self._info(won=False)

    def step(self, action):
        obs, reward, done, _ = self.engine.step(str(action).strip())  # the engine answers invalid actions itself
        return self._format(obs), float(reward), bool(done), False, self._info(bool(done and reward == 1.0))

    def _format(self, obs):
        """§10: the page's ' [SEP] ' pieces after the instruction, single-quoted and joined by ' [SEP] ' (the raw
        text if the instruction is not on the page)."""
        pieces = obs.split(" [SEP] ")
        if self.task not in pieces:
            return obs
        return " [SEP] ".join(f"'{p}'" for p in pieces[pieces.index(self.task) + 1:])

    def _admissible(self):
        avail = self.engine.get_available_actions()
        return (["search[<your query>]"] if avail["has_search_bar"] else []) + \
            [f"click[{c}]" for c in avail["clickables"]]

    def _info(self, won):
        return dict(task=self.task, task_type="webshop", admissible_actions=self._admissible(), won=won,
                    goal_index=self.goal_index)


ENVS = {"alfworld": ALFWorldEnv, "webshop": WebShopEnv}


# ---- env pool ----

def shares(n, parts):
    """n items split into `parts` contiguous ranges (the env pool's workers, torchrun's ranks)."""
    return [range(w * n // parts, (w + 1) * n // parts) for w in range(parts)]


def _worker(conn, name, seeds, options):
    """Serve ("reset", games) and ("step", actions) for this worker's envs until ("close", None)."""
    try:
        envs = [make(name, seed=s, **options) for s in seeds]
        conn.send(("ok", None))
        for cmd, args in iter(conn.recv, ("close", None)):
            conn.send(("ok", [env.reset(a) if cmd == "reset" else None if a is None else env.step(a)
                              for env, a in zip(envs, args)]))
    except Exception:
        conn.send(("error", traceback.format_exc()))


class EnvPool:
    """n environments stepped in `workers` processes (contiguous shares); env i has seed `seed + i`.
    reset(games) and step(actions) return lists in env order; games[i] picks env i's game (None: the env's
    own choice), an action of None leaves that env alone (its entry is None). A worker that raises or dies
    is reported with its error instead of hanging. Workers start from a forkserver, so that a pool created
    after CUDA or an in-process vLLM engine never forks their threads."""

    def __init__(self, name, n, workers, seed=0, **options):
        self.n, self.shards = n, shares(n, min(workers, n))
        ctx = mp.get_context("forkserver")  # workers forked from a clean server, not from a process with CUDA/vLLM
        ctx.set_forkserver_preload(["envs"])
        self.conns, children = zip(*[ctx.Pipe() for _ in self.shards])
        self.procs = [ctx.Process(target=_worker, args=(child, name, [seed + i for i in shard], options), daemon=True)
                      for child, shard in zip(children, self.shards)]
        for proc in self.procs:
            proc.start()
        self._gather()

    def _ask(self, cmd, per_env):
        """Each worker's share of `per_env` with the command, then every answer, concatenated in env order."""
        for w, (shard, conn) in enumerate(zip(self.shards, self.conns)):
            try:
                conn.send((cmd, per_env[shard.start:shard.stop]))
            except OSError as e:  # the worker is gone
                self._fail(f"env worker {w} died", e)
        return self._gather()

    def _gather(self):
        results = []
        for w, (proc, conn) in enumerate(zip(self.procs, self.conns)):
            while not conn.poll(1.0):
                if not proc.is_alive():
                    self._fail(f"env worker {w} died")
            try:
                status, payload = conn.recv()
            except (EOFError, OSError) as e:  # the worker died with the pipe open
                self._fail(f"env worker {w} died", e)
            if status == "error":
                self._fail(f"env worker {w} failed:\n{payload}")
            results += payload or []
        return results

    def _fail(self, message, cause=None):
        procs = self.procs
        self.close()
        raise RuntimeError(f"{message} (worker exit codes {[p.exitcode for p in procs]})") from cause

    def reset(self, games=None):
        return self._ask("reset", games or [None] * self.n)

    def step(self, actions):
        return self._ask("step", actions)

    def close(self):
        for proc, conn in zip(self.procs, self.conns):
            if proc.is_alive():
                conn.send(("close", None))
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.procs = []
