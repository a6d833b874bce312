"""hiper.py: reward shaping, token masks on a real chat template, PPO, resume."""
import json
import os
import re

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import demo
import envs
import hiper
import plumbing

OK = "<switch>SWITCH</switch><subgoal>find a mug</subgoal><action>go to cabinet 1</action>"


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


def test_block_masks_find_tags_as_the_parsers_do(tiny):
    """<SWITCH>…</SWITCH> is no switch block for either parser (an invalid KEEP turn): its tokens get no A_term and
    V_low falls back to index 0; <ACTION> is found, as the env-side parse lower-cases before searching it."""
    _, (tok, *_) = tiny
    text = "<SWITCH>SWITCH</SWITCH><SUBGOAL>find a mug</SUBGOAL><ACTION>go to cabinet 1</ACTION>"
    assert envs.parse_response(text)[:2] == ("go to cabinet 1", False) and not envs.is_boundary(text)
    spans, decoded = hiper.token_spans(tok, tok(text, add_special_tokens=False).input_ids)
    masks = hiper.block_masks(spans, decoded)
    assert not any(masks["switch"]) and not any(masks["subgoal"]) and all(masks["action"][-3:])
    assert not any(masks["action"][:3]) and hiper.v_low_index(spans, decoded) == 0


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
    hiper.update(cfg, policy, opt, [s], hiper.actor_loss, tok.pad_token_id, __import__("random").Random(0), 1)
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
    torch.nn.init.normal_(critic.score.weight)  # distinct V_low / V_high / V_term (the small init makes them close)
    p = tok.apply_chat_template([{"role": "user", "content": "task"}], add_generation_prompt=True)
    p = list(p["input_ids"] if hasattr(p, "keys") else p)
    texts = [OK, keep(), OK + "<|im_end|>"]
    traj = [dict(prompt=p, response=tok(x, add_special_tokens=False).input_ids, text=x, valid=True, won=i == 2,
                 done=i == 2, boundary=i != 1, task_type="t") for i, x in enumerate(texts)]
    cfg = hiper.Config(adv=adv, microbatch=2)
    samples = hiper.advantages(cfg, hiper.score(cfg, hiper.annotate(cfg, [traj], tok), tok, policy, ref, critic))
    def only(s, key):  # tokens in this block alone (a BPE token may straddle two tags, §15.5)
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
    samples = hiper.grpo_advantages(cfg, hiper.score(cfg, hiper.annotate(cfg, trajs, tok), tok, policy, ref,
                                                     critic))
    spread = (10.0 + 0.1) / 2 ** 0.5  # unbiased std of two values is |a − b| / √2
    expected = [(10.0 - 4.95) / spread, (-0.1 - 4.95) / spread, 0.0, 0.0]
    for s, e in zip(samples, expected):
        assert s["loss_mask"].any()
        torch.testing.assert_close(s["adv"][s["loss_mask"]], torch.full((int(s["loss_mask"].sum()),), e), rtol=1e-4,
                                   atol=1e-5)
        assert not s["adv"][~s["loss_mask"]].any()


def scripted(monkeypatch, tok, responses):
    """hiper.generate replaced by a script: call k answers every prompt with responses[k] (the last one after
    the end). Returns the prompts of each call."""
    seen = []

    def generate(policy, tok_, prompts, *args, **kwargs):
        seen.append(prompts)
        r = tok(responses[min(len(seen), len(responses)) - 1], add_special_tokens=False).input_ids + [tok.eos_token_id]
        return [(tok(hiper.chat(tok, p)).input_ids, r) for p in prompts]

    monkeypatch.setattr(hiper, "generate", generate)
    return seen


def play(cfg, policy, tok, n=1, split="train", games=None):
    pool = hiper.env_pool(cfg, n, split, cfg.seed)
    try:
        return hiper.rollout(cfg, policy, tok, pool, cfg.temperature, list(range(n)), games)
    finally:
        pool.close()


def test_next_prompt_shows_the_official_subgoal_after_malformed_turns(tiny, alf_data, monkeypatch):
    """§2: the next prompt's subgoal is the <subgoal> text after a good switch word, "" after a bad word, a
    missing subgoal block or no action block, and the action's last 30 characters without switch tags."""
    _, (tok, policy, _, _) = tiny
    seen = scripted(monkeypatch, tok, [OK, "<switch>MAYBE</switch><subgoal>x</subgoal><action>look</action>",
                                       "<subgoal>y</subgoal><action>inventory</action>", "no action here",
                                       "<switch>KEEP</switch><subgoal>z</subgoal><action>look</action>",
                                       "<switch>SWITCH</switch><action>look</action>", OK])
    trajs = play(hiper.Config(data_dir=alf_data, max_turns=7, history=1), policy, tok)
    shown = [re.search("Current subgoal: (.*)\n", p[0]).group(1) for p in seen]
    assert shown == ["None", "find a mug", "", "inventory", "", "z", ""]
    assert [t["valid"] for t in trajs[0]] == [True, False, False, False, True, False, True]


def test_time_out_is_terminal_but_a_shorter_rollout_cap_truncates(tiny, alf_data, monkeypatch):
    """The env's step limit ends the episode as done: its last segment bootstraps to 0 (R_high = G). A rollout cap
    below the env's limit truncates: with bootstrap_truncated, R_high = G + V_high(b_0) (self-bootstrap, §5)."""
    path, _ = tiny
    tok, policy, ref, critic = hiper.load_models(path, path)
    torch.nn.init.normal_(critic.score.weight)  # values far from 0
    scripted(monkeypatch, tok, ["<switch>KEEP</switch><subgoal>wait</subgoal><action>look</action>"])
    for max_turns, done in ((3, [False, False, True]), (2, [False, False])):
        cfg = hiper.Config(data_dir=alf_data, max_turns=max_turns, env_max_steps=3, microbatch=4)
        traj = play(cfg, policy, tok)[0]
        assert [t["done"] for t in traj] == done
        # one segment
        samples = hiper.advantages(cfg, hiper.score(cfg, hiper.annotate(cfg, [traj], tok), tok, policy, ref, critic))
        g = sum(s["reward"] for s in samples)
        boot = 0.0 if done[-1] else samples[0]["values"][1].item()
        assert samples[0]["returns"][1].item() == pytest.approx(g + boot, abs=1e-5)
        assert done[-1] or abs(boot) > 1e-3  # so the truncated case differs from the terminal one


def test_critic_head_is_hugging_faces_new_token_classification_head(tiny):
    """§7: 3 outputs, weight ~ N(0, initializer_range²) (0.02 for Qwen2.5; the tiny model's 0.1), bias 0, no
    dropout; the same seed draws the same head."""
    path, (_, _, _, critic) = tiny
    w, std = critic.score.weight, critic.config.initializer_range
    assert std == 0.1 and w.shape[0] == 3 and abs(w.std().item() / std - 1) < 0.2 and not critic.score.bias.any()
    assert critic.dropout.p == 0.0 and torch.equal(hiper.load_models(path, path)[3].score.weight, w)


def test_value_loss_is_the_clipped_squared_error_without_a_half(monkeypatch):
    """§7: per head, max((v − R)², (v_clip − R)²) averaged over that head's turns; L = sum of the heads."""
    v = torch.tensor([[1.0, 0.2, -1.0], [3.0, 9.0, 0.0]], requires_grad=True)
    monkeypatch.setattr(hiper, "critic_values", lambda critic, mb, pad_id: v[[s["row"] for s in mb]])
    mb = [dict(row=0, values=torch.zeros(3), returns=torch.tensor([2.0, 0.0, 0.5]), value_mask=torch.tensor([1, 1, 1])),
          dict(row=1, values=torch.tensor([2.8, 0.0, 0.0]), returns=torch.tensor([3.0, 5.0, 1.0]),
               value_mask=torch.tensor([1, 0, 1]))]
    loss, heads = hiper.critic_loss(hiper.Config(value_clip=0.5), None, mb, 0, mb)
    # low: max(1, 1.5²) and 0 → 1.125; high: 0.2² (row 1 masked) → 0.04; term: max(1.5², 1) and 1 → 1.625
    torch.testing.assert_close(heads, torch.tensor([1.125, 0.04, 1.625]))
    assert loss.item() == pytest.approx(2.79)


def test_a_non_finite_gradient_skips_the_step_and_is_counted(tiny):
    path, _ = tiny
    tok, policy, _, _ = hiper.load_models(path, path)
    s = sample(tok, OK, float("nan"))
    with torch.no_grad():
        before = hiper.response_logprobs(policy, [s], tok.pad_token_id)[0]
    s.update(old_logp=before, ref_logp=before)
    w0 = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    cfg, rng = hiper.Config(), __import__("random").Random(0)
    _, skipped = hiper.update(cfg, policy, opt, [s], hiper.actor_loss, tok.pad_token_id, rng, epochs=2)
    assert skipped == 2 and all(torch.equal(w0[k], v) for k, v in policy.state_dict().items())
    s["adv"] = torch.ones_like(s["adv"])
    _, skipped = hiper.update(cfg, policy, opt, [s], hiper.actor_loss, tok.pad_token_id, rng, epochs=1)
    assert skipped == 0 and not all(torch.equal(w0[k], v) for k, v in policy.state_dict().items())


def small_run(tmp_path):
    """One generated training game, a tiny model on its text, and the arguments of a 3-env CPU run."""
    data, tiny = str(tmp_path / "alf"), str(tmp_path / "tiny")
    demo.generate_alfworld_games(data, 1, seed=1, split="train", max_receptacles=6, n_distractors=2)
    demo.build_tiny(tiny, demo.game_texts(data), seed=6)
    return tiny, ["--model", tiny, "--data_dir", data, "--n_envs", "3", "--max_turns", "3", "--max_new_tokens", "24",
                  "--eval_every", "0", "--minibatch", "64", "--microbatch", "8", "--env_workers", "1",
                  "--save_every", "1", "--actor_lr", "1e-3", "--critic_lr", "2e-3"]


def test_critic_warmup_holds_the_actor_and_critic_epochs_run_e_passes(tmp_path):
    """--critic_warmup 2: in iterations 1-2 only the critic steps and the policy keeps its initial weights;
    --critic_epochs 3: 3 critic steps per iteration (one minibatch holds the batch), then the actor's 1."""
    from transformers import AutoModelForCausalLM
    tiny, args = small_run(tmp_path)
    run = str(tmp_path / "run")
    steps = []  # the learning rate of each optimizer step: 2e-3 critic, 1e-3 actor
    hook = register_optimizer_step_pre_hook(lambda opt, *_: steps.append(opt.param_groups[0]["lr"]))
    try:
        hiper.main(args + ["--run_dir", run, "--iters", "2", "--critic_warmup", "2", "--critic_epochs", "3"])
        assert steps == [2e-3] * 6
        init = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
        after = AutoModelForCausalLM.from_pretrained(os.path.join(run, "checkpoint", "policy")).state_dict()
        assert all(torch.equal(init[k], after[k]) for k in init)
        critic = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["critic"]
        assert not all(torch.equal(init[k], critic[k]) for k in init if k.startswith("model."))
        hiper.main(args + ["--run_dir", run, "--iters", "3", "--critic_warmup", "2", "--critic_epochs", "3",
                           "--resume"])
        # loading an optimizer state first initialises it with one zero-lr step (torch's own), not an update
        assert [lr for lr in steps if lr] == [2e-3] * 9 + [1e-3]
    finally:
        hook.remove()


def test_explained_variance_against_a_hand_computation():
    """1 − Var(R − V)/Var(R) per head over that head's turns (population variances)."""
    samples = [dict(values=torch.tensor(v), returns=torch.tensor(r), value_mask=torch.tensor(m)) for v, r, m in [
        ([1.0, 0.0, 2.0], [2.0, 5.0, 2.0], [True, True, True]), ([1.0, 9.0, 0.0], [0.0, 9.0, 4.0], [True, False, True]),
        ([3.0, 2.0, 1.0], [4.0, 1.0, 1.0], [True, True, False])]]
    # low: R − V = (1, −1, 1), Var 8/9; Var(R) = 8/3 → 2/3. high: (5, −1), 9; (5, 1), 4 → −1.25. term: (0, 4), 4; 1 → −3
    assert hiper.explained_variance(samples) == pytest.approx([2 / 3, -1.25, -3.0])
    # every episode lost alike: returns without variance give None, not a huge negative number
    flat = [dict(values=torch.tensor([0.1 * i, 0.0, 0.0]), returns=torch.tensor([-0.1, 0.0, 0.0]),
                 value_mask=torch.tensor([True, i == 0, True])) for i in range(4)]
    assert hiper.explained_variance(flat) == [None, None, None]


def test_paired_evaluation_replays_the_same_games_and_seeds(tiny, alf_data, monkeypatch):
    """Each game eval_episodes times, episode e of game g from its own seed (seed, g, e) whatever came before: the
    same policy validated twice plays the same games and samples the same responses."""
    _, (tok, policy, _, _) = tiny
    cfg = hiper.Config(data_dir=alf_data, max_turns=2, max_new_tokens=12, eval_episodes=2, eval_temperature=1.0)
    calls, real = [], hiper.rollout

    def spy(*args, **kwargs):
        trajs = real(*args, **kwargs)
        calls.append((list(args[5]), list(args[6]), [t["text"] for tr in trajs for t in tr]))
        return trajs

    monkeypatch.setattr(hiper, "rollout", spy)
    first = hiper.validate(cfg, policy, tok, 0)
    torch.manual_seed(12345)
    torch.rand(7)
    second = hiper.validate(cfg, policy, tok, 0)
    assert calls[:2] == calls[2:] and calls[0][1] == [g for g in range(6) for _ in range(2)]
    assert calls[0][0] == [hiper.mix(cfg.seed + 1000, g, e) for g in range(6) for e in range(2)]
    assert len(set(calls[0][0])) == 12 and len(set(calls[0][2])) > 1  # a seed per episode; sampled, not greedy
    wins = first["valid_seen/wins"]
    assert first == second and len(wins) == 6 and all(len(w) == 2 for w in wins)


def test_a_rows_sample_depends_on_its_seed_alone(tiny):
    """Seeded sampling (the Gumbel-max trick, one generator per row): a prompt's response is the same alone or in
    a batch, at any position, and changes with its seed; the draws follow softmax(logits / T)."""
    _, (tok, policy, _, _) = tiny
    prompts = ["task: find a mug", "task: heat an egg", "task: look at a book"]
    together = hiper.generate(policy, tok, prompts, 16, 1.0, seeds=[5, 9, 11])
    alone = hiper.generate(policy, tok, prompts[1:2], 16, 1.0, seeds=[9])
    swapped = hiper.generate(policy, tok, prompts[::-1], 16, 1.0, seeds=[11, 9, 5])
    assert together[1] == alone[0] and together == swapped[::-1]
    assert len({tuple(r) for _, r in hiper.generate(policy, tok, prompts[:1] * 8, 16, 1.0, seeds=list(range(8)))}) > 1
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    draws = torch.stack([hiper.gumbel_sampler([s], 0.7, "cpu")(None, logits).argmax(1)[0] for s in range(4000)])
    freq = torch.bincount(draws, minlength=4) / 4000.0
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, 0), atol=0.03, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--n_envs", "0"], "--n_envs 0: must be at least 1"), (["--minibatch", "0"], "--minibatch 0: must be at least 1"),
    (["--microbatch", "-2"], "--microbatch -2: must be at least 1"), (["--iters", "-1"], "--iters -1: must be at least 0"),
    (["--eval_episodes", "0"], "--eval_episodes 0: must be at least 1"), (["--adv", "ppo"], "invalid choice: 'ppo'"),
    (["--adv", "grpo", "--n_envs", "12", "--group_size", "8"], "--n_envs 12 divisible by --group_size 8"),
    (["--adv", "grpo", "--env", "webshop"], "--adv grpo needs training games"),
    (["--keep_mode", "sometimes"], "invalid choice: 'sometimes'"),
    (["--env", "minecraft"], "--env minecraft: unknown environment 'minecraft'"),
    (["--env", "demo:Nope"], "--env demo:Nope: module 'demo' has no attribute 'Nope'"),
])
def test_settings_that_cannot_work_fail_in_one_line_before_any_model(args, message, capsys):
    with pytest.raises(SystemExit):
        hiper.main(["--model", "/no/such/model"] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_missing_data_and_a_resume_with_other_settings_fail_before_any_model(tmp_path):
    """The data check and the checkpoint's saved config are read before a model is loaded (the model path here
    does not exist, so reaching it would raise another error)."""
    with pytest.raises(FileNotFoundError, match=r"json_2\.1\.1/train.*alfworld-download"):
        hiper.main(["--model", "/no/such/model", "--data_dir", str(tmp_path)])
    run = tmp_path / "run"
    os.makedirs(run / "checkpoint")
    saved = hiper.parse_config(["--model", "/no/such/model", "--actor_lr", "1e-6", "--run_dir", str(run)])
    torch.save(dict(config=__import__("dataclasses").asdict(saved)), run / "checkpoint" / "state.pt")
    with pytest.raises(SystemExit, match=r"--actor_lr 2e-06 \(saved: 1e-06\)"):
        hiper.main(["--model", "/no/such/model", "--actor_lr", "2e-6", "--run_dir", str(run), "--resume"])


@pytest.mark.parametrize("platform, maxrss", [("linux", 3 * 2 ** 20), ("darwin", 3 * 2 ** 30)])
def test_peak_memory_reads_ru_maxrss_in_the_platforms_unit(monkeypatch, platform, maxrss):
    """3 GiB of peak RSS: Linux reports ru_maxrss in KiB, macOS in bytes."""
    import resource
    import types
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(plumbing.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert plumbing.memory_gb() == dict(peak_memory_gb=pytest.approx(3.0))


def test_gpu_peak_memory_is_the_trainers_since_the_last_call(monkeypatch):
    """Torch counts a sleeping vLLM engine's weights and KV cache as allocated: the trainer's peak leaves them out,
    and each call (one per iteration) starts a new window."""
    import types
    peak = [10 * 2 ** 30]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak[0])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.__setitem__(0, 4 * 2 ** 30))
    engine = types.SimpleNamespace(allocated=3 * 2 ** 30)
    assert plumbing.memory_gb(engine) == dict(peak_memory_gb=7.0, engine_memory_gb=3.0)
    assert plumbing.memory_gb(engine) == dict(peak_memory_gb=1.0, engine_memory_gb=3.0)
    assert plumbing.memory_gb() == dict(peak_memory_gb=4.0)  # --backend hf: no engine
