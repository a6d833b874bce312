"""hiper.py: parsing table, reward shaping, token masks on a real chat template, PPO, resume."""
import json
import os

import pytest
import torch

import demo
import envs
import hiper

OK = "<switch>SWITCH</switch><subgoal>find a mug</subgoal><action>go to cabinet 1</action>"
# (model output, expected (switch, subgoal, action sent to the env, valid)) — spec §2 and issue 5
PARSE_TABLE = [
    (OK, ("SWITCH", "find a mug", "go to cabinet 1", True)),
    ("<switch>KEEP</switch><subgoal>find a mug</subgoal><action>open cabinet 1</action>",
     ("KEEP", "find a mug", "open cabinet 1", True)),
    ("<switch> keep </switch><subgoal>find a mug</subgoal><action>look</action>", ("KEEP", "find a mug", "look", True)),
    ("<switch>switch</switch>\n<subgoal>heat it</subgoal>\n<action>heat mug 1 with microwave 1</action>",
     ("SWITCH", "heat it", "heat mug 1 with microwave 1", True)),
    ("<SWITCH>SWITCH</SWITCH><SUBGOAL>x y</SUBGOAL><ACTION>Go To Fridge 1</ACTION>", ("SWITCH", "x y", "go to fridge 1", True)),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action>  take apple 1 from table 1  </action>",
     ("SWITCH", "a", "take apple 1 from table 1", True)),
    ("<switch>KEEP</switch><subgoal>a</subgoal><action>search[red shirt]</action>", ("KEEP", "a", "search[red shirt]", True)),
    ("<switch>KEEP</switch><subgoal>a</subgoal><action>click[buy now]</action><|im_end|>",
     ("KEEP", "a", "click[buy now]", True)),
    ("<switch>SWITCH</switch><subgoal>find</subgoal><action>fly to mars</action>",  # not checked against admissible
     ("SWITCH", "find", "fly to mars", True)),
    # missing action block: env gets the last 30 characters of the lower-cased text
    ("<switch>SWITCH</switch><subgoal>find a mug</subgoal>go to cabinet 1",
     (None, None, "find a mug</subgoal>go to cabinet 1"[-30:], False)),
    ("I will go to the fridge now", (None, None, "i will go to the fridge now", False)),
    ("", (None, None, "", False)),
    ("<action>go to desk 1", (None, None, "<action>go to desk 1", False)),
    ("go to desk 1</action>", (None, None, "go to desk 1</action>", False)),
    ("</action>go to desk 1<action>", (None, None, "</action>go to desk 1<action>", False)),
    ("<switch>SWITCH</switch><subgoal>" + "x" * 40 + "</subgoal>", (None, None, ("x" * 40 + "</subgoal>")[-30:], False)),
    # action found, other rules broken: the action still goes to the env, the turn is invalid
    ("<subgoal>find a mug</subgoal><action>look</action>", (None, "find a mug", "look", False)),
    ("<switch>MAYBE</switch><subgoal>a</subgoal><action>look</action>", ("MAYBE", "a", "look", False)),
    ("<switch></switch><subgoal>a</subgoal><action>look</action>", ("", "a", "look", False)),
    ("<switch>KEEP SWITCH</switch><subgoal>a</subgoal><action>look</action>", ("KEEP SWITCH", "a", "look", False)),
    ("<switch>SWITCH</switch><action>look</action>", ("SWITCH", None, "look", False)),
    ("<switch>SWITCH</switch><subgoal></subgoal><action>look</action>", ("SWITCH", "", "look", False)),
    ("<switch>SWITCH</switch><subgoal>   </subgoal><action>look</action>", ("SWITCH", "", "look", False)),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action></action>", ("SWITCH", "a", "", False)),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action>  </action>", ("SWITCH", "a", "", False)),
    ("<switch>SWITCH</switch><subgoal>找杯子</subgoal><action>look</action>", ("SWITCH", "找杯子", "look", False)),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action>look 看</action>", ("SWITCH", "a", "look 看", False)),
    ("<switch>SWITCH</switch><switch>KEEP</switch><subgoal>a</subgoal><action>look</action>",
     ("SWITCH", "a", "look", False)),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><action>look</action><action>inventory</action>",
     ("SWITCH", "a", "look", False)),
    ("<switch>SWITCH</switch><subgoal>a</subgoal><subgoal>b</subgoal><action>look</action>",
     ("SWITCH", "a", "look", False)),
    ("<switch>SWITCH</switch><subgoal>a<action>look</action>", ("SWITCH", None, "look", False)),
]


@pytest.mark.parametrize("text,expected", PARSE_TABLE)
def test_parse_table(text, expected):
    assert envs.parse_response(text, "alfworld") == expected


def test_parse_webshop_fallback_is_20_chars():
    assert envs.parse_response("x" * 50 + "click[buy]", "webshop") == (None, None, ("x" * 50 + "click[buy]")[-20:], False)


@pytest.mark.parametrize("text,boundary", [
    (OK, True), ("<switch>KEEP</switch><subgoal>a</subgoal>", False), ("<switch> keep </switch>", False),
    ("no tags at all", False), ("<switch></switch>", False), ("<switch>MAYBE</switch>", True),  # asymmetry (§2)
    ("<switch>SWITCH</switch><switch>KEEP</switch>", True), ("<switch>KEEP</switch><switch>SWITCH</switch>", False),
])
def test_boundary_parse(text, boundary):
    assert envs.is_boundary(text) == boundary


def turn(text, won=False, valid=True):
    return dict(text=text, won=won, valid=valid)


def keep(sub="find a mug"):
    return f"<switch>KEEP</switch><subgoal>{sub}</subgoal><action>look</action>"


def test_rewards_land_on_the_right_turns():
    cfg = hiper.Config()
    traj = [turn(OK), turn(keep()), turn(keep("find the mug"), valid=False), turn(OK), turn(keep(), won=True)]
    sub = [[1, 2], [1, 2], [1, 3], [4], [4]]  # subgoal-span token ids: turn 2 rewords its subgoal
    r = hiper.shape_rewards(cfg, traj, sub)
    k = -0.3 / 5  # normalized keep penalty κ/T on each KEEP turn
    assert r == pytest.approx([0.0, k, k - 0.3 - 0.1, 0.0, k + 10.0])
    r = hiper.shape_rewards(hiper.Config(keep_mode="fixed"), traj, sub)
    assert r == pytest.approx([0.0, -0.3, -0.3 - 0.3 - 0.1, 0.0, -0.3 + 10.0])
    # a one-turn trajectory gets no normalized keep penalty; turn 0 saying KEEP is penalised in fixed mode
    assert hiper.shape_rewards(cfg, [turn(keep())], [[1]]) == [0.0]
    assert hiper.shape_rewards(hiper.Config(keep_mode="fixed"), [turn(keep())], [[1]]) == [-0.3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    texts = [envs.FORMAT_RULES, envs.SUBGOAL_RULES, OK * 3, "go to cabinet 1, open fridge 1, take mug 2 from desk 1"]
    demo.build_tiny(path, texts)
    return path, hiper.load_models(path, path)


def test_masks_and_value_positions_on_chat_template(tiny):
    _, (tok, *_) = tiny
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    response = "<switch>SWITCH</switch>\n<subgoal>find a mug</subgoal> <action>go to cabinet 1</action><|im_end|>"
    ids = tok(response, add_special_tokens=False).input_ids
    assert ids[-1] == tok.eos_token_id
    spans, text = hiper.token_spans(tok, ids)
    masks = hiper.block_masks(spans, text)
    pieces = {k: tok.decode([i for i, m in zip(ids, v) if m]) for k, v in masks.items()}
    for tag in ("switch", "subgoal", "action"):
        block = text[text.index(f"<{tag}>"):text.index(f"</{tag}>") + len(tag) + 3]
        assert block in pieces[tag] and len(pieces[tag]) - len(block) <= 2  # only merged neighbours
    assert not masks["action"][-1] and not masks["subgoal"][0]  # EOS and other blocks excluded
    j = hiper.v_low_index(spans, text)
    assert spans[j][0] >= text.index("</subgoal>") + len("</subgoal>") and spans[j - 1][0] < text.index("</subgoal>") + 10
    no_action = tok("just some words", add_special_tokens=False).input_ids
    spans, text = hiper.token_spans(tok, no_action)
    assert all(hiper.block_masks(spans, text)["action"]) and hiper.v_low_index(spans, text) == 0


def sample(tok, response, adv):
    p = tok.apply_chat_template([{"role": "user", "content": "task"}], add_generation_prompt=True)
    p = p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p
    r = tok(response, add_special_tokens=False).input_ids
    return dict(prompt=list(p), response=r, adv=torch.full((len(r),), adv), loss_mask=torch.ones(len(r), dtype=torch.bool))


def test_actor_loss_matches_hand_computation(tiny):
    _, (tok, policy, _, _) = tiny
    s = sample(tok, OK, 0.7)
    with torch.no_grad():
        logp, ent = hiper.response_logprobs(policy, [s], tok.pad_token_id, with_entropy=True)
    s.update(old_logp=logp[0], ref_logp=logp[0])  # ratio 1, KL 0
    cfg = hiper.Config()
    loss, _ = hiper.actor_loss(cfg, policy, [s], tok.pad_token_id, [s])
    assert loss.item() == pytest.approx(-0.7 - cfg.entropy_coef * ent[0].mean().item(), rel=1e-5)
    s["old_logp"] = logp[0] - 1.0  # ratio e > 1 + ε: the clipped term binds for a positive advantage
    loss, stats = hiper.actor_loss(cfg, policy, [s], tok.pad_token_id, [s])
    assert stats[0].item() == pytest.approx(-0.7 * 1.2, rel=1e-5) and stats[3].item() == 1.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ppo_update_moves_logprobs_with_the_advantage(tiny, sign):
    path, _ = tiny
    tok, policy, _, _ = hiper.load_models(path, path)
    s = sample(tok, OK, sign)
    with torch.no_grad():
        before = hiper.response_logprobs(policy, [s], tok.pad_token_id)[0]
    s.update(old_logp=before, ref_logp=before)
    cfg = hiper.Config(kl_coef=0.0, entropy_coef=0.0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    hiper.update(cfg, policy, opt, [s], hiper.actor_loss, tok.pad_token_id, __import__("random").Random(0))
    with torch.no_grad():
        after = hiper.response_logprobs(policy, [s], tok.pad_token_id)[0]
    assert sign * (after.sum() - before.sum()).item() > 0


def test_two_iterations_then_resume_equals_uninterrupted(tmp_path):
    data = str(tmp_path / "alf")
    demo.generate_alfworld_games(data, 1, seed=1, split="train", max_receptacles=6, n_distractors=2)
    demo.build_tiny(str(tmp_path / "tiny"), demo.game_texts(data), seed=6)
    args = ["--model", str(tmp_path / "tiny"), "--data_dir", data, "--n_envs", "3", "--max_turns", "3",
            "--max_new_tokens", "24", "--eval_every", "0", "--minibatch", "6", "--microbatch", "3",
            "--env_workers", "1", "--save_every", "1", "--actor_lr", "1e-3", "--critic_lr", "1e-3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    hiper.main(args + ["--run_dir", full, "--iters", "3"])
    hiper.main(args + ["--run_dir", part, "--iters", "2"])
    hiper.main(args + ["--run_dir", part, "--iters", "3", "--resume"])
    read = lambda run: [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]  # noqa: E731
    a, b = read(full), read(part)
    assert len(a) == len(b) == 3
    skip = {"rollout_s", "update_s", "tokens_per_s", "env_steps_per_s", "peak_memory_gb"}  # wall-clock
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in skip} == {k: v for k, v in y.items() if k not in skip}
    wa = torch.load(os.path.join(full, "checkpoint", "state.pt"), weights_only=False)["critic"]
    wb = torch.load(os.path.join(part, "checkpoint", "state.pt"), weights_only=False)["critic"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {"success", "invalid_rate", "switch_rate", "kl", "value_loss_high"} <= set(a[0])


@pytest.mark.parametrize("adv", ["hae", "gae"])
def test_token_advantages_follow_the_levels(tiny, adv):
    """HAE: subgoal tokens train only on boundary turns, each block with its own level; flat GAE: one
    advantage on every block of every turn. Checked against hae.py on the same turn tensors."""
    path, _ = tiny
    tok, policy, ref, critic = hiper.load_models(path, path)
    torch.manual_seed(0)
    torch.nn.init.normal_(critic.head.weight)  # distinct V_low / V_high / V_term (zero-init makes them equal)
    p = tok.apply_chat_template([{"role": "user", "content": "task"}], add_generation_prompt=True)
    p = list(p["input_ids"] if hasattr(p, "keys") else p)
    texts = [OK, keep(), OK + "<|im_end|>"]
    traj = [dict(prompt=p, response=tok(x, add_special_tokens=False).input_ids, text=x, valid=True, won=i == 2,
                 done=i == 2, boundary=i != 1, task_type="t") for i, x in enumerate(texts)]
    cfg = hiper.Config(adv=adv, microbatch=2)
    samples = hiper.advantages(cfg, hiper.score(cfg, [traj], tok, policy, ref, critic))
    def only(s, key):  # tokens in this block alone (a BPE token may straddle two tags, pitfall 5)
        m = {k: torch.tensor(v) for k, v in s["masks"].items()}
        return m[key] & ~sum(m[k].int() for k in m if k != key).bool()

    keep_sub = only(samples[1], "subgoal")
    assert keep_sub.any() and samples[1]["loss_mask"][keep_sub].all() == (adv == "gae")  # KEEP subgoal
    for s in samples:
        vals = {k: set(s["adv"][only(s, k)].tolist()) for k in ("switch", "subgoal", "action")}
        assert all(len(v) == 1 for v in vals.values())  # one advantage per block
        same = vals["switch"] == vals["action"]
        assert same == (adv == "gae")
    r = torch.tensor([[s["reward"] for s in samples]])
    v = torch.stack([s["values"] for s in samples])[None]  # [1, T, 3]
    done = torch.tensor([[False, False, True]])
    boundary = torch.tensor([[True, False, True]]) if adv == "hae" else torch.tensor([[True, False, False]])
    v_high = v[..., 1] if adv == "hae" else v[..., 0]
    from hae import hae
    ref_out = hae(r, v[..., 0], v_high, boundary, done)
    ret = torch.stack([s["returns"] for s in samples])
    torch.testing.assert_close(ret[:, 0], ref_out.ret_low[0])


def test_grpo_advantage_is_the_group_normalised_episode_return(tiny):
    """Two groups of two episodes: each episode's advantage is (R − mean of its group) / (std + 1e-6) on
    every block of every turn, with the std unbiased; worked by hand for returns (10.0, −0.1) and (0, 0)."""
    path, _ = tiny
    tok, policy, ref, critic = hiper.load_models(path, path)
    p = tok.apply_chat_template([{"role": "user", "content": "task"}], add_generation_prompt=True)
    p = list(p["input_ids"] if hasattr(p, "keys") else p)
    def traj(won, valid=True):
        return [dict(prompt=p, response=tok(OK, add_special_tokens=False).input_ids, text=OK, valid=valid, won=won,
                     done=won, boundary=True, task_type="t")]
    cfg = hiper.Config(adv="grpo", group_size=2, microbatch=4)
    trajs = [traj(True), traj(False, valid=False), traj(False), traj(False)]
    samples = hiper.advantages(cfg, hiper.score(cfg, trajs, tok, policy, ref, critic))
    spread = (10.0 + 0.1) / 2 ** 0.5  # unbiased std of two values is |a − b| / √2
    expected = [(10.0 - 4.95) / spread, (-0.1 - 4.95) / spread, 0.0, 0.0]
    for s, e in zip(samples, expected):
        assert s["loss_mask"].any()
        torch.testing.assert_close(s["adv"][s["loss_mask"]], torch.full((int(s["loss_mask"].sum()),), e), rtol=1e-4,
                                   atol=1e-5)
        assert not s["adv"][~s["loss_mask"]].any()
