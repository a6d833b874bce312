"""The offline kit of the CPU demo: what lets HiPER run on a laptop without downloads. The method (hiper.py,
hae.py, envs.py) never imports this file; it trains what this file builds exactly as it trains a Hugging Face
checkpoint on a GPU.

    python demo.py --data_dir data/alfworld --run_dir runs/demo      # games, tiny model, warm start
    python hiper.py --model runs/demo/warm-start --data_dir data/alfworld --run_dir runs/demo ...

1. ALFWorld games in the released layout, generated from files inside the alfworld wheel
   (`generate_alfworld_games`); the real engine plays them. The warm start's own games (<data_dir>/sft) are
   not RL's training games (`games`).
2. Plan-execute walkthroughs of the warm start's games (`plan_execute_demos`), optionally by a demonstrator that
   wastes turns (`--dither`): a flaw for RL to remove.
3. A tiny Qwen2 and a byte-level BPE tokenizer with a ChatML template, trained on the games' text (`build_tiny`).
4. A supervised warm start on the walkthroughs (`warm_start`), saved to <run_dir>/warm-start.
"""
import argparse
import concurrent.futures
import json
import math
import os
import random
import re
import shutil

import torch
from tqdm import tqdm

import envs
import hiper

# ---- offline ALFWorld games ----

_ROOMS = {"Kitchen": range(1, 31), "LivingRoom": range(201, 231), "Bedroom": range(301, 331),
          "Bathroom": range(401, 431)}
_LAMP_HOLDERS = ("SideTable", "Desk", "Dresser", "DiningTable", "CoffeeTable", "Shelf")
_APPLIANCE = {"pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),
              "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
              "pick_cool_then_place_in_recep": ("Coolable", "Fridge")}


def _mangle(name):
    for a, b in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(a, b)
    return name


def _sample_game(rng, task_type, split, max_receptacles, n_distractors):
    """One game's PDDL problem and traj_data, or None if the drawn room cannot host the task."""
    from alfworld.gen import constants as C
    from alfworld.gen import goal_library
    layouts = os.path.join(os.path.dirname(C.__file__), "layouts")
    # valid_unseen: the last five rooms of each room type, which the other splits never use
    rooms = [n for room in sorted(C.GOALS_VALID[task_type]) for n in _ROOMS[room]
             if (n % 100 > 25) == (split == "valid_unseen")]
    floor_plan = rng.choice(rooms)
    with open(os.path.join(layouts, f"FloorPlan{floor_plan}-objects.json")) as f:
        classes = set(json.load(f))
    with open(os.path.join(layouts, f"FloorPlan{floor_plan}-openable.json")) as f:
        poses = json.load(f)
    receptacles = {}  # id -> (class, location)
    for rid, (x, z, rot, hor) in sorted(poses.items()):
        cls = {"Sink": "SinkBasin", "Bathtub": "BathtubBasin"}.get(rid.split("|")[0], rid.split("|")[0])
        if cls in C.VAL_RECEPTACLE_OBJECTS and cls not in C.MOVABLE_RECEPTACLES_SET:
            rid = rid if rid.endswith(cls) else rid + "|" + cls  # ALFRED's basin ids, shown as "sinkbasin 1"
            loc = f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{round(rot / 90)}|{round(hor)}"
            receptacles[_mangle(rid)] = (cls, _mangle(loc))
    present = {c for c, _ in receptacles.values()}
    movable = classes - C.RECEPTACLES | (classes & C.MOVABLE_RECEPTACLES_SET)
    holders = lambda obj: [r for r, (c, _) in receptacles.items() if obj in C.VAL_RECEPTACLE_OBJECTS[c]]  # noqa: E731
    action, appliance = _APPLIANCE.get(task_type, (None, None))
    toggle = ""
    if task_type == "look_at_obj_in_light":
        lamp_spots = [r for r, (c, _) in receptacles.items() if c in _LAMP_HOLDERS]
        if "DeskLamp" not in classes or not lamp_spots:
            return None
        toggle, parent = "DeskLamp", ""
        objs = sorted(o for o in movable if o not in C.MOVABLE_RECEPTACLES_SET and holders(o) and o != "DeskLamp")
    else:
        if appliance and appliance not in present:
            return None
        objs = sorted(o for o in movable if holders(o) and (not action or o in C.VAL_ACTION_OBJECTS[action]))
    if not objs:
        return None
    obj = rng.choice(objs)
    if task_type != "look_at_obj_in_light":
        parents = sorted({c for c in present if obj in C.VAL_RECEPTACLE_OBJECTS[c]} - {appliance})
        if not parents:
            return None
        parent = rng.choice(parents)
    # keep the receptacles the task needs, then fill the room up to max_receptacles
    need = [rng.choice([r for r, (c, _) in receptacles.items() if c == cls]) for cls in (parent, appliance) if cls]
    if toggle:
        need.append(rng.choice(lamp_spots))
    others = [r for r in receptacles if r not in need]
    rng.shuffle(others)
    keep = need + others[:max(0, (max_receptacles or len(receptacles)) - len(need))]
    receptacles = {r: receptacles[r] for r in sorted(keep)}
    spots = lambda o: [r for r in holders(o) if r in receptacles and receptacles[r][0] != parent]  # noqa: E731
    if not spots(obj):
        return None
    placed = []  # (class, receptacle id)
    n_target = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    placed += [(obj, rng.choice(spots(obj))) for _ in range(n_target)]
    if toggle:
        placed.append((toggle, need[-1]))
    distractors = [o for o in sorted(movable - {obj, toggle}) if spots(o)]
    placed += [(o, rng.choice(spots(o))) for o in rng.sample(distractors, min(n_distractors, len(distractors)))]

    rtypes = sorted(C.RECEPTACLES - C.MOVABLE_RECEPTACLES_SET)
    otypes = sorted(C.OBJECTS_SET - set(rtypes))
    agent_loc = _mangle(f"loc|{rng.randint(-20, 20)}|{rng.randint(-20, 20)}|{rng.randint(0, 3)}|30")
    objects, init = [], [f"(atLocation agent1 {agent_loc})", "(= (total-cost) 0)"]
    for rid, (cls, loc) in receptacles.items():
        init += [f"(receptacleType {rid} {cls}Type)", f"(receptacleAtLocation {rid} {loc})"]
        init += [f"(openable {rid})"] if cls in C.OPENABLE_CLASS_SET else []
    for cls, rid in placed:
        oid = _mangle(f"{cls}|{rng.uniform(-3, 3):+06.2f}|{rng.uniform(0, 2):+06.2f}|{rng.uniform(-3, 3):+06.2f}")
        objects.append(oid)
        init += [f"(objectType {oid} {cls}Type)", f"(inReceptacle {oid} {rid})",
                 f"(objectAtLocation {oid} {receptacles[rid][1]})"]
        init += [f"(pickupable {oid})"] if cls != toggle else [f"(toggleable {oid})"]
        init += [f"(isReceptacleObject {oid})"] if cls in C.MOVABLE_RECEPTACLES_SET else []
        init += [f"({a.lower()} {oid})" for a in ("Cleanable", "Heatable", "Coolable", "Sliceable")
                 if cls in C.VAL_ACTION_OBJECTS[a]]
    init += [f"(canContain {r}Type {o}Type)" for r in sorted({c for c, _ in receptacles.values()})
             for o in sorted({c for c, _ in placed}) if o in C.VAL_RECEPTACLE_OBJECTS[r]]
    locations = sorted({loc for _, loc in receptacles.values()} | {agent_loc})
    decl = (["agent1 - agent"] + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
            + [f"{o} - object" for o in objects] + [f"{r} - receptacle" for r in receptacles]
            + [f"{loc} - location" for loc in locations])
    goal = goal_library.gdict[task_type]["pddl"].format(obj=obj, recep=parent, toggle=toggle).replace("#", "-")
    goal = goal.rstrip()[:-1]  # the library's goal text also closes the (define ...)
    problem = ("(define (problem plan_trial)\n(:domain alfred)\n(:objects\n    " + "\n    ".join(decl)
               + "\n)\n(:init\n    " + "\n    ".join(init) + "\n)\n" + goal + "(:metric minimize (total-cost))\n)\n")
    params = dict(object_target=obj, parent_target=parent, toggle_target=toggle, mrecep_target="",
                  object_sliced=False)
    template = rng.choice(goal_library.gdict[task_type]["templates"])
    task = template.format(obj=obj.lower(), recep=parent.lower(), toggle=toggle.lower(), mrecep="")
    traj = dict(task_type=task_type, pddl_params=params, scene=dict(floor_plan=f"FloorPlan{floor_plan}"),
                task_desc=task)
    return f"{task_type}-{obj}-None-{parent or toggle}-{floor_plan}", problem, traj


def generate_alfworld_games(out_dir, per_task_type, seed, split="train", task_types=envs.ALFWORLD_TASK_TYPES,
                            max_receptacles=None, n_distractors=6):
    """Write `per_task_type` solvable games of each type in ALFWorld's released layout,
    <out_dir>/json_2.1.1/<split>/<task>-<Obj>-None-<Parent>-<scene>/trial_<id>/{game.tw-pddl,traj_data.json},
    using only files inside the alfworld wheel. Each game's planner walkthrough is replayed to won=True.
    valid_unseen uses rooms that train/valid_seen never use. Returns the game files written."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv
    alf_data = os.path.join(os.path.dirname(__import__("alfworld").__file__), "data")
    with open(os.path.join(alf_data, "alfred.pddl")) as f, open(os.path.join(alf_data, "alfred.twl2")) as g:
        domain, grammar = f.read(), g.read()
    envs._install_sas_cache()
    written = []
    for task_type in task_types:
        rng = random.Random(f"{seed}/{split}/{task_type}")
        made = 0
        while made < per_task_type:
            sample = _sample_game(rng, task_type, split, max_receptacles, n_distractors)
            if sample is None:
                continue
            name, problem, traj = sample
            game = dict(pddl_domain=domain, grammar=grammar.replace("UNKNOWN GOAL", traj["task_desc"]),
                        pddl_problem=problem, solvable=False, walkthrough=None)
            env = AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True, policy_commands=True)))
            env.load(game)  # the walkthrough in demangled names ("mug 1"), as the player sees them
            state = env.reset()
            plan = list(state["policy_commands"])
            for command in plan:
                state, _, _ = env.step(command)
            if not plan or not state["won"]:
                continue
            game.update(solvable=True, walkthrough=plan)
            game_dir = os.path.join(out_dir, "json_2.1.1", split, name, f"trial_{seed}_{made:04d}")
            os.makedirs(game_dir, exist_ok=True)
            with open(os.path.join(game_dir, "game.tw-pddl"), "w") as f:
                json.dump(game, f)
            with open(os.path.join(game_dir, "traj_data.json"), "w") as f:
                json.dump(traj, f, indent=1)
            written.append(os.path.join(game_dir, "game.tw-pddl"))
            made += 1
    return written


# ---- plan-execute walkthroughs ----

def _stage_subgoal(action):
    """The subgoal of a walkthrough stage that ends with `action` (numbers dropped: the agent names the
    object class before it has seen the instance)."""
    name = lambda s: re.sub(r" \d+$", "", s.strip())  # noqa: E731  "apple 1" → "apple"
    verb, _, rest = action.partition(" ")
    if verb == "take":
        return f"find and take the {name(rest.split(' from ')[0])}"
    if verb in ("clean", "heat", "cool"):
        obj, _, tool = rest.partition(" with ")
        return f"{verb} the {name(obj)} with the {name(tool)}"
    if verb == "use":
        return f"turn on the {name(rest)}"
    obj, _, recep = rest.partition(" to ")  # move X to Y
    return f"put the {name(obj)} in the {name(recep)}"


STAGE_END = ("take", "clean", "heat", "cool", "use", "move")  # the verbs that end a walkthrough stage


def _search(admissible, here, order):
    """The next receptacle to look in: `open` the current one if closed, else go to the receptacle after it in
    `order` (every receptacle of the room), wrapping around."""
    if f"open {here}" in admissible:
        return f"open {here}"
    return "go to " + order[(order.index(here) + 1) % len(order) if here in order else 0]


def planner_env(split, data_dir, max_steps=50):
    """An ALFWorld env whose state also holds the PDDL planner's plan to the goal (`policy_commands`)."""
    env = envs.ALFWorldEnv(split, data_dir=data_dir, max_steps=max_steps)
    env.infos.policy_commands = True  # before any game is loaded
    return env


def plan_execute_demos(data_dir, split="train", history=2, max_steps=50, dither=0.0, seed=0):
    """Warm-start data for the CPU demo: every game's walkthrough as plan-execute turns. The PDDL planner knows
    where objects are; where it heads for one to take or use, the walkthrough searches instead (`_search`), in
    the sorted order of the receptacles (a random order per game, which the policy cannot infer from one
    record of history, made a warm start that won 0.03 of its training episodes instead of 0.34).
    A dithering demonstrator (`dither` > 0) first says `look`, which changes nothing, with that probability at
    every turn: a flaw that wastes turns, for RL to remove (the ALFWorld counterpart of the ladder's demonstrator
    that reads its light 40 % of the time). Stages end at their first take/clean/heat/cool/use/move action;
    every turn of a stage carries its subgoal, SWITCH on its first turn, KEEP after. Returns (prompt, response)
    pairs per game, prompts as a rollout's."""
    env = planner_env(split, data_dir, max_steps)
    rng = random.Random(seed)
    demos = []
    for g in range(len(env.game_files)):
        obs, info = env.reset(g)
        steps, won, here = [], False, None
        order = sorted(a[6:] for a in info["admissible_actions"] if a.startswith("go to "))
        while not won and len(steps) < max_steps and env.state["policy_commands"]:
            action = env.state["policy_commands"][0]
            goal = next((a for a in env.state["policy_commands"] if a.split(" ")[0] not in ("go", "open")), "")
            if rng.random() < dither:
                action = "look"
            elif action.startswith("go to ") and goal.split(" ")[0] in ("take", "use"):  # the planner's shortcut
                action = _search(info["admissible_actions"], here, order)
            here = action[6:] if action.startswith("go to ") else here
            steps.append((obs, info, action))
            obs, _, _, _, info = env.step(action)
            won = info["won"]
        if not won:
            continue
        subgoals, stage = [None] * len(steps), []
        for t, (_, _, action) in enumerate(steps):
            stage.append(t)
            if action.split(" ")[0] in STAGE_END or t == len(steps) - 1:
                for k in stage:
                    subgoals[k] = _stage_subgoal(action)
                stage = []
        pairs, past, current = [], [], "None"
        for t, (obs, info, action) in enumerate(steps):
            prompt = envs.alfworld_prompt(info["task"], obs, past[-history:] if history else [], t, current,
                                     info["admissible_actions"])
            switch = "SWITCH" if t == 0 or subgoals[t] != subgoals[t - 1] else "KEEP"
            response = f"<switch>{switch}</switch><subgoal>{subgoals[t]}</subgoal><action>{action}</action>"
            pairs.append((prompt, response))
            past.append((obs, action))
            current = subgoals[t]
        demos.append(pairs)
    return demos


# ---- the ladder: controlled plan-execute tasks that run in seconds ----

COLOURS = ("red", "green", "blue", "yellow")


class Fixed:
    """Rung a of the ladder: one light, always switched off by the same button (blue), which the observation does
    not name; one turn. An environment with ALFWorld's interface and prompt (`hiper.py --env demo:Fixed`): the
    trainer plays it through the same rollout, parser, rewards and updates. Game g is a seeded draw of the lights'
    colours; `eval_splits` hold other draws. Pressing the light's button switches it off and opens the next; a
    wrong press answers "Nothing happens."; won when the last light is off; done then or at `max_steps`."""
    lights, named, max_steps, verb = 1, False, 1, "switch"
    prompt = staticmethod(envs.alfworld_prompt)
    eval_splits = ("test",)
    N_GAMES = dict(train=256, test=64)

    @classmethod
    def n_games(cls, data_dir, split):
        return cls.N_GAMES[split]

    def __init__(self, split="train", seed=0, data_dir=None, max_steps=None):
        self.split, self.max_steps = split, max_steps or self.max_steps
        self.rng, self.next_game = random.Random(seed), 0
        lights = "lights in order" if self.lights > 1 else "light"
        self.task = f"{self.verb} off the {lights}, each with the right button"

    def reset(self, game=None):
        if game is None and self.split == "train":
            game = self.rng.randrange(self.N_GAMES["train"])
        elif game is None:
            game, self.next_game = self.next_game, (self.next_game + 1) % self.N_GAMES[self.split]
        draw = random.Random(f"{type(self).__name__}/{self.split}/{game}")
        self.colours = [draw.choice(COLOURS) if self.named else "blue" for _ in range(self.lights)]
        self.lit = self.steps = 0
        return f"Your task is to: {self.task}. {self._light()}", self._info()

    def step(self, action):
        self.steps += 1
        if str(action).strip() == f"press {self.colours[self.lit]}":
            self.lit += 1
            obs = f"Light {self.lit} is off." + (f" {self._light()}" if self.lit < self.lights else "")
        else:
            obs = f"Nothing happens. {self._light()}"
        won = self.lit == self.lights
        return obs, float(won), won or self.steps >= self.max_steps, False, self._info()

    def _light(self):
        colour = f"is {self.colours[self.lit]}" if self.named else "is on"
        return f"Light {self.lit + 1} of {self.lights} {colour}."

    def _info(self):
        return dict(task=self.task, task_type=type(self).__name__.lower(), won=self.lit == self.lights,
                    admissible_actions=[f"press {c}" for c in COLOURS])


class Read(Fixed):
    """Rung b: one light, switched off by the button of the colour its observation names (the model must read)."""
    named = True


class Stages(Fixed):
    """Rung c: three lights in order, each named by its observation and switched off by its colour's button; a
    terminal reward only, 6 steps. A light is a stage: a good policy SWITCHes to a new subgoal when one goes off."""
    lights, named, max_steps = 3, True, 6


class Long(Stages):
    """Rung d: rung c made long, eight lights in 14 steps: eight segments, one terminal reward, the credit of each
    press delayed by up to 13 turns (the horizon HAE is for, METHOD.md §5)."""
    lights, max_steps = 8, 14


class Turn(Long):
    """Rung e: rung d worded so that no subgoal token is a tag's: `turn off light k` (in rung d's `switch off light
    k` the tiny tokenizer's `switch` is also the tag's, and HiPER's subgoal advantage broke the format: results/)."""
    verb = "turn"


def ladder_demos(env_name, episodes, read_rate, seed=0):
    """Warm-start data for a ladder task: `episodes` episodes of a demonstrator whose subgoal names the current
    light (SWITCH when one goes off, KEEP while retrying) and who presses the named button with probability
    `read_rate`, a random one otherwise. Returns (prompt, response) pairs per episode, prompts as a rollout's."""
    rng, env = random.Random(seed), envs.make(env_name, seed=seed)
    demos = []
    for _ in range(episodes):
        obs, info = env.reset()
        done, pairs, current, past = False, [], "None", []
        while not done:
            subgoal = f"{env.verb} off light {env.lit + 1}"
            colour = env.colours[env.lit] if rng.random() < read_rate else rng.choice(COLOURS)
            switch = "KEEP" if subgoal == current else "SWITCH"
            pairs.append((env.prompt(info["task"], obs, past[-1:], len(pairs), current, info["admissible_actions"]),
                          f"<switch>{switch}</switch><subgoal>{subgoal}</subgoal><action>press {colour}</action>"))
            past.append((obs, f"press {colour}"))
            current = subgoal
            obs, _, done, _, info = env.step(f"press {colour}")
        demos.append(pairs)
    return demos


# ---- tiny model and supervised warm start ----

def build_tiny(path, texts, seed=0, init_std=0.1):
    """A tiny Qwen2 policy (4 layers, hidden 128, 0.7M parameters) and a byte-level BPE tokenizer with a ChatML
    template, made offline. Weights are drawn N(0, init_std²): at Hugging Face's default 0.02 this model (and one
    twice as wide) never learns to copy a word of its observation into its action, even under full supervision;
    at 0.1 it does within two epochs (results/README.md, the ladder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=init_std)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def game_texts(data_dir):
    """The tokenizer's text: the grammars of the training games (every object and command) and the prompt rules."""
    texts = []
    for f in envs.alfworld_game_files(data_dir, "train"):
        with open(f) as g:
            texts.append(json.load(g)["grammar"])
    return texts + [envs.FORMAT_RULES, envs.SUBGOAL_RULES]


def warm_start(policy, tok, demos, epochs, lr, batch, seed, weight_decay=0.01, grad_clip=1.0):
    """Supervised fine-tuning on plan-execute walkthroughs: maximise log π(response | prompt), token-mean,
    `epochs` passes in batches of `batch` turns, the learning rate falling linearly from `lr` to 0."""
    samples = [dict(prompt=tok(hiper.chat(tok, p)).input_ids, response=tok(r).input_ids + [tok.eos_token_id])
               for game in demos for p, r in game]
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, epochs * math.ceil(len(samples) / batch))
    rng = random.Random(seed)
    policy.train()
    bar = tqdm(range(epochs), desc="warm start")
    for _ in bar:
        rng.shuffle(samples)
        for k in range(0, len(samples), batch):
            mb = samples[k:k + batch]
            logp = hiper.response_logprobs(policy, mb, tok.pad_token_id)
            m = torch.stack([torch.arange(logp.shape[1], device=logp.device) < len(s["response"]) for s in mb])
            loss = -(logp * m).sum() / m.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
            opt.step()
            decay.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")


# ---- the demo's preparation, end to end ----

GAME_SETTINGS = ("sft_games", "train_games", "eval_games", "max_receptacles", "n_distractors")


def sft_dir(data_dir):
    """The warm start's own games: <data_dir>/sft."""
    return os.path.join(data_dir, "sft")


def games(a):
    """The demo's games, once (their settings in <data_dir>/generated): small rooms (5 receptacles, no distractors).
    The warm start's own games, <data_dir>/sft (60 per task type, seed 0), are never played by RL: RL trains on
    <data_dir>'s train split (20 per type, seed 1) and validates on its held-out splits (5 per type each, seed 0).
    Two processes, three task types each (each type has its own seed, so the files are the same as one process
    writes). Games generated with other settings stop the run: they are data, not a cache to overwrite."""
    marker, want = os.path.join(a.data_dir, "generated"), {k: getattr(a, k) for k in GAME_SETTINGS}
    if os.path.exists(marker):
        with open(marker) as f:
            have = json.loads(f.read() or "{}")
        if have != want:
            raise SystemExit(f"{a.data_dir} holds games generated with {have}, not {want}: remove it or pass "
                             "another --data_dir")
        return
    sets = ((sft_dir(a.data_dir), "train", a.sft_games, 0), (a.data_dir, "train", a.train_games, 1),
            (a.data_dir, "valid_seen", a.eval_games, 0), (a.data_dir, "valid_unseen", a.eval_games, 0))
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        jobs = [pool.submit(generate_alfworld_games, root, n, seed, split, envs.ALFWORLD_TASK_TYPES[half::2],
                            a.max_receptacles, a.n_distractors) for half in (0, 1) for root, split, n, seed in sets]
        for job in jobs:
            job.result()  # a failed generation raises here, before the marker is written
    with open(marker, "w") as f:
        json.dump(want, f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="alfworld",
                   help="alfworld, or a ladder task: demo:Fixed, demo:Read, demo:Stages, demo:Long, demo:Turn")
    p.add_argument("--data_dir", default="data/alfworld")
    p.add_argument("--run_dir", default="runs/demo", help="writes <run_dir>/tiny-init and <run_dir>/warm-start")
    p.add_argument("--games_only", action="store_true", help="generate the games and stop")
    p.add_argument("--sft_games", type=int, default=60, help="the warm start's games per task type (never RL's)")
    p.add_argument("--train_games", type=int, default=20, help="RL's training games per task type")
    p.add_argument("--eval_games", type=int, default=5, help="games per task type in each held-out split")
    p.add_argument("--max_receptacles", type=int, default=5)
    p.add_argument("--n_distractors", type=int, default=0)
    p.add_argument("--history", type=int, default=1, help="as hiper.py's --history: the prompts of a rollout")
    p.add_argument("--init_std", type=float, default=0.1, help="the tiny model's initial weights: N(0, init_std²)")
    p.add_argument("--episodes", type=int, default=300, help="ladder: demonstrated episodes")
    p.add_argument("--read_rate", type=float, default=0.5, help="ladder: how often the demonstrator reads its light")
    p.add_argument("--dither", type=float, default=0.0,
                   help="alfworld: how often the demonstrator says `look` (a wasted turn) before its next action")
    p.add_argument("--sft_epochs", type=int, default=8)
    p.add_argument("--sft_lr", type=float, default=1e-3, help="at the start, falling linearly to 0")
    p.add_argument("--sft_batch", type=int, default=8, help="turns per optimizer step")
    p.add_argument("--seed", type=int, default=6)
    a = p.parse_args(argv)
    ladder = a.env != "alfworld"
    if not ladder:
        games(a)
    if a.games_only:
        return
    tiny, warm = os.path.join(a.run_dir, "tiny-init"), os.path.join(a.run_dir, "warm-start")
    settings = {k: v for k, v in vars(a).items() if k not in ("games_only", "run_dir")}
    path = os.path.join(a.run_dir, "kit.json")
    if os.path.isdir(warm):  # a warm start without kit.json predates the record: rebuilt too
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f) == settings:
                    return  # built with these settings already
        print(f"{a.run_dir}: built with other settings ({path}); rebuilding its tiny model and warm start")
        for d in (tiny, warm):
            shutil.rmtree(d, ignore_errors=True)
    sft_games = sft_dir(a.data_dir)
    demos = ladder_demos(a.env, a.episodes, a.read_rate, a.seed) if ladder else \
        plan_execute_demos(sft_games, "train", a.history, dither=a.dither, seed=a.seed)
    if not os.path.isdir(tiny):
        texts = [p + r for game in demos for p, r in game]
        build_tiny(tiny, texts if ladder else game_texts(sft_games) + texts, a.seed, a.init_std)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, policy = AutoTokenizer.from_pretrained(tiny), AutoModelForCausalLM.from_pretrained(tiny)
    warm_start(policy, tok, demos, a.sft_epochs, a.sft_lr, a.sft_batch, a.seed)
    policy.save_pretrained(warm)
    tok.save_pretrained(warm)
    with open(path, "w") as f:
        json.dump(settings, f)


if __name__ == "__main__":
    main()
