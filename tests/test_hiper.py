"""hiper.py: reward shaping, token masks on a real chat template, PPO, resume."""
import io
import json
import math
import os
import re
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def full_vocab_logprobs(model, samples, pad_id, temperature=1.0):
    """The slow reference: one fp32 log-softmax over the whole [N, R, V] (the trainer's computation before chunking),
    at `temperature`: log-probs and entropy [N, R]."""
    ids, attn, pos, P = hiper.pad_batch(samples, pad_id, model.device)
    lm = model(ids, attention_mask=attn, position_ids=pos, logits_to_keep=ids.shape[1] - P + 1)
    logp = torch.log_softmax(lm.logits[:, :-1].float() / temperature, -1)
    return logp.gather(-1, ids[:, P:, None])[..., 0], -(logp.exp() * logp).sum(-1)


class Allocations(TorchDispatchMode):
    """The shape of every tensor an op allocates (an output that shares no storage with the op's inputs)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.shapes += [(func.overloadpacket.__name__, tuple(o.shape)) for o in tree_leaves(out)
                        if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("chunk", [2, 4, 32])
def test_chunked_logprobs_and_entropy_equal_the_full_vocabulary_computation(monkeypatch, chunk):
    """Log-probs and entropy in chunks of `chunk` response positions (recomputed in the backward pass) equal one
    log-softmax over the whole [N, R, V], value and gradient; and no tensor over the vocabulary of more than
    N × chunk × V elements is allocated, forward or backward, but the logits and their gradient."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    V = 5000
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3))
    rows = [(5, 9), (3, 4), (7, 1)]  # prompt and response lengths: N = 3, R = 9
    samples = [dict(prompt=torch.randint(1, V, (p,)).tolist(), response=torch.randint(1, V, (r,)).tolist())
               for p, r in rows]
    w = torch.randn(2, 3, 9)  # a loss weighing every entry, junk past a row's response included
    monkeypatch.setattr(hiper, "LOGP_CHUNK", chunk)
    for temperature in (1.0, 0.7):
        grads = []
        for fn in (full_vocab_logprobs, lambda *args: hiper.response_logprobs(*args, with_entropy=True)):
            model.zero_grad()
            with Allocations() as seen:
                out = fn(model, samples, 0, temperature)
                (w[0] * out[0] + w[1] * out[1]).sum().backward()
            grads.append((torch.stack(out), [p.grad.clone() for p in model.parameters()]))
        (ref, ref_g), (got, got_g) = grads
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        big = [op for op, shape in seen.shapes if shape[-1:] == (V,) and math.prod(shape) > 3 * chunk * V]
        assert big == (["mm", "cat"] if chunk < 9 else [])  # the logits; their gradient, from the chunks' gradients
        assert sum(op == "_log_softmax" for op, _ in seen.shapes) == 2 * math.ceil(9 / chunk)  # forward, recomputed


def test_old_and_reference_logprobs_are_those_of_the_sampling_distribution(tiny):
    """As the official scripts: at a training temperature T, the old and reference log-probs (and the entropy) are
    those of softmax(logits / T), the distribution the rollout sampled from, read from the logits HF generate saw at
    each step; at T = 1, the untempered ones."""
    _, (tok, policy, ref, critic) = tiny
    enc = tok([hiper.chat(tok, p) for p in ("task: find a mug", "task: heat an egg")], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        out = policy.generate(**enc, do_sample=False, logits_processor=[hiper.gumbel_sampler([3, 4], 0.7, "cpu", [])],
                              max_new_tokens=12, pad_token_id=tok.pad_token_id, output_logits=True,
                              return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1)  # [2, 12, V]: the raw logits each sampled token was drawn from
    new = out.sequences[:, enc.input_ids.shape[1]:]
    turns = []
    for i in range(2):
        r = new[i].tolist()
        r = r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r
        turns.append(dict(prompt=enc.input_ids[i][enc.attention_mask[i].bool()].tolist(), response=r))
    sampler_logp = {}
    for T in (0.7, 1.0):
        logp = torch.log_softmax(logits / T, -1)  # [2, 12, V]
        sampler_logp[T] = logp.gather(-1, new[..., None])[..., 0]
        turns = [dict(prompt=s["prompt"], response=s["response"]) for s in turns]  # scored afresh at each T
        hiper.score(hiper.Config(temperature=T, adv="grpo"), [turns], tok, policy, ref, critic)
        for i, s in enumerate(turns):
            torch.testing.assert_close(s["old_logp"], sampler_logp[T][i, :len(s["response"])], rtol=0, atol=1e-4)
            torch.testing.assert_close(s["ref_logp"], s["old_logp"])  # the reference is the initial policy
        with torch.no_grad():
            ent = hiper.response_logprobs(policy, turns[:1], tok.pad_token_id, T, with_entropy=True)[1][0]
        lp = logp[0, :len(turns[0]["response"])]
        torch.testing.assert_close(ent, -(lp.exp() * lp).sum(-1), rtol=0, atol=1e-4)
    assert (sampler_logp[0.7] - sampler_logp[1.0]).abs().max() > 0.1  # so the temperature matters here


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


def test_micro_batches_of_like_lengths_give_the_minibatchs_gradient(tiny):
    """update() splits each minibatch into micro-batches of like lengths: one SGD step (lr 1, so the move is the
    clipped gradient) with micro-batches of 2 equals the step with the whole minibatch of 6 in one pass."""
    import random
    path, _ = tiny
    moves = []
    for micro in (6, 2):
        tok, policy, _, _ = hiper.load_models(path, path)
        init = [q.detach().clone() for q in policy.parameters()]
        samples = [sample(tok, OK, a) for a in (0.5, -1.0, 2.0, 0.3, -0.7, 1.1)]
        for k, s in enumerate(samples):
            s["prompt"] = s["prompt"][:len(s["prompt"]) - 2 * k]  # six prompt lengths
            with torch.no_grad():
                s["old_logp"] = s["ref_logp"] = hiper.response_logprobs(policy, [s], tok.pad_token_id)[0] - 0.05 * k
        hiper.update(hiper.Config(minibatch=6, microbatch=micro), policy, torch.optim.SGD(policy.parameters(), lr=1.0),
                     samples, hiper.actor_loss, tok.pad_token_id, random.Random(0), 1)
        moves.append(torch.cat([(q.detach() - q0).flatten() for q, q0 in zip(policy.parameters(), init)]))
    assert moves[0].abs().max() > 1e-3
    torch.testing.assert_close(moves[1], moves[0], rtol=1e-4, atol=1e-6)


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


def test_pg_variance_is_the_spread_of_the_ppo_minibatch_gradients_at_ratio_one(tiny):
    """--pg_variance against a slow loop: per estimator, each full minibatch's gradient of the actor's PPO loss
    (entropy and KL off) at ratio 1 through update()'s backward pass, then Σ_k ‖g_k − ḡ‖² / K and ‖ḡ‖²."""
    import random
    path, _ = tiny
    tok, policy, ref, critic = hiper.load_models(path, path)
    torch.manual_seed(1)
    torch.nn.init.normal_(critic.score.weight)
    p = tok.apply_chat_template([{"role": "user", "content": "task"}], add_generation_prompt=True)
    p = list(p["input_ids"] if hasattr(p, "keys") else p)
    texts = [OK, keep(), OK.replace("mug", "cup"), keep("find a cup") + "<|im_end|>"]
    trajs = [[dict(prompt=p + [b], response=tok(x, add_special_tokens=False).input_ids, text=x, valid=True,
                   won=b == 1 and i == 3, done=i == 3, boundary=i in (0, 2), task_type="t")
              for i, x in enumerate(texts)] for b in range(3)]
    cfg = hiper.Config(minibatch=5, microbatch=5, entropy_coef=0.0, kl_coef=0.0)
    hiper.score(cfg, hiper.annotate(cfg, trajs, tok), tok, policy, ref, critic)
    fields = [sorted(s) for tr in trajs for s in tr]
    got = hiper.pg_variance(cfg, policy, trajs, tok.pad_token_id)
    assert [sorted(s) for tr in trajs for s in tr] == fields  # the batch's own turns are left as they were
    assert hiper.pg_variance(hiper.Config(minibatch=7), policy, trajs, tok.pad_token_id) == {}  # one minibatch
    order = random.Random(cfg.seed).sample(range(12), 12)
    for adv in ("hae", "gae"):
        samples = hiper.advantages(hiper.Config(adv=adv), [[dict(s) for s in tr] for tr in trajs])
        grads = []
        for k in (0, 5):  # the two full minibatches of 5 out of 12 turns
            mb = [dict(samples[i]) for i in order[k:k + 5]]
            for s in mb:
                s["old_logp"] = s["ref_logp"]  # the rollout policy is the reference here: ratio 1
            policy.zero_grad()
            hiper.actor_loss(cfg, policy, mb, tok.pad_token_id, mb)[0].backward()
            grads.append(torch.cat([q.grad.flatten() for q in policy.parameters()]))
        mean = (grads[0] + grads[1]) / 2
        var = sum(((g - mean) ** 2).sum().item() for g in grads) / 2
        assert got[f"pg_var_{adv}"] == pytest.approx(var, rel=1e-4) and var > 0
        assert got[f"pg_mean_sq_{adv}"] == pytest.approx((mean ** 2).sum().item(), rel=1e-4)
    assert got["pg_var_hae"] != pytest.approx(got["pg_var_gae"], rel=1e-3)


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
        return [(tok(hiper.chat(tok, p)).input_ids, r, None) for p in prompts]

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


def test_update_leaves_no_gradient_allocated(tiny):
    """Gradients are freed after every step, taken or skipped (non-finite), so none stays allocated after `update`
    through the next wake, scoring and the other model's update."""
    path, _ = tiny
    tok, policy, _, _ = hiper.load_models(path, path)
    samples = [sample(tok, OK, 1.0), sample(tok, keep(), float("nan"))]
    for s in samples:
        with torch.no_grad():
            s["old_logp"] = s["ref_logp"] = hiper.response_logprobs(policy, [s], tok.pad_token_id)[0]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    _, skipped = hiper.update(hiper.Config(minibatch=1), policy, opt, samples, hiper.actor_loss, tok.pad_token_id,
                              __import__("random").Random(0), epochs=2)
    assert skipped == 2 and opt.state  # 2 steps taken, 2 skipped
    assert all(p.grad is None for p in policy.parameters())


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
    ids = lambda outs: [(p, r) for p, r, _ in outs]  # noqa: E731
    together = ids(hiper.generate(policy, tok, prompts, 16, 1.0, seeds=[5, 9, 11]))
    alone = ids(hiper.generate(policy, tok, prompts[1:2], 16, 1.0, seeds=[9]))
    swapped = ids(hiper.generate(policy, tok, prompts[::-1], 16, 1.0, seeds=[11, 9, 5]))
    assert together[1] == alone[0] and together == swapped[::-1]
    eight = ids(hiper.generate(policy, tok, prompts[:1] * 8, 16, 1.0, seeds=list(range(8))))
    assert len({tuple(r) for _, r in eight}) > 1
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    draws = torch.stack([hiper.gumbel_sampler([s], 0.7, "cpu", [])(None, logits).argmax(1)[0] for s in range(4000)])
    freq = torch.bincount(draws, minlength=4) / 4000.0
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, 0), atol=0.03, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generation_gives_the_old_logprobs_a_forward_pass_gives(tiny, temperature):
    """PPO's old log-probs come from the sampling pass itself (HF): each drawn token's log-probability under
    softmax(logits / T), equal to a separate fp32 forward pass over prompt + response and to hiper's own
    response_logprobs at T; greedy generation gives none."""
    _, (tok, policy, _, _) = tiny
    prompts = ["task: find a mug", "task: heat an egg, then put it in the fridge", "task: look"]
    outs = hiper.generate(policy, tok, prompts, 16, temperature, seeds=[3, 4, 5])
    samples = [dict(prompt=p, response=r) for p, r, _ in outs]
    ids, attn, pos, P = hiper.pad_batch(samples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = policy(ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1] / temperature
        want = torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None])[..., 0]
        ours = hiper.response_logprobs(policy, samples, tok.pad_token_id, temperature)
    for (_, r, logp), w, o in zip(outs, want, ours):
        assert len(logp) == len(r) > 1
        torch.testing.assert_close(logp, w[:len(r)], atol=1e-5, rtol=0)
        torch.testing.assert_close(logp, o[:len(r)], atol=1e-5, rtol=0)
    assert all(logp is None for _, _, logp in hiper.generate(policy, tok, prompts, 8, 0.0))


def test_critic_values_read_only_up_to_the_last_value_position(tiny):
    """The critic stops reading at the V_low position (§7): the values equal those read from a forward pass over
    the whole prompt + response."""
    _, (tok, _, _, critic) = tiny
    response = tok(OK, add_special_tokens=False).input_ids + [tok.eos_token_id]
    spans, text = hiper.token_spans(tok, response)
    samples = [dict(prompt=tok(hiper.chat(tok, p)).input_ids, response=response, v_low_idx=hiper.v_low_index(spans, text))
               for p in ("task: find a mug", "task: heat an egg, then put it in the fridge")]
    ids, attn, pos, P = hiper.pad_batch(samples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        out = critic(input_ids=ids, attention_mask=attn, position_ids=pos).logits  # [N, L, 3]
        got = hiper.critic_values(critic, samples, tok.pad_token_id)
    j = samples[0]["v_low_idx"]
    assert 0 < j < len(response) - 1
    torch.testing.assert_close(got, torch.stack([out[:, P - 1 + j, 0], out[:, P - 1, 1], out[:, P - 1, 2]], 1),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--n_envs", "0"], "--n_envs 0: must be at least 1"), (["--minibatch", "0"], "--minibatch 0: must be at least 1"),
    (["--microbatch", "-2"], "--microbatch -2: must be at least 1"), (["--iters", "-1"], "--iters -1: must be at least 0"),
    (["--eval_episodes", "0"], "--eval_episodes 0: must be at least 1"), (["--adv", "ppo"], "invalid choice: 'ppo'"),
    (["--adv", "grpo", "--n_envs", "12", "--group_size", "8"], "--n_envs 12 divisible by --group_size 8"),
    (["--adv", "grpo", "--env", "webshop"], "--adv grpo needs training games"),
    (["--keep_mode", "sometimes"], "invalid choice: 'sometimes'"),
    (["--temperature", "0"], "--temperature 0.0: training samples need a temperature above 0"),
    (["--adv", "grpo", "--pg_variance"], "--pg_variance needs the critic's values (not --adv grpo)"),
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


def terminal(monkeypatch, tty):
    """sys.stderr replaced by a buffer that says whether it is a terminal; returns the buffer."""
    err = io.StringIO()
    err.isatty = lambda: tty
    monkeypatch.setattr(sys, "stderr", err)
    return err


def test_progress_bars_show_only_on_a_terminal(monkeypatch):
    for tty in (True, False):
        err = terminal(monkeypatch, tty)
        assert list(plumbing.progress(range(3), "rollout turns", lambda: dict(active_envs=5))) == [0, 1, 2]
        shown = err.getvalue()
        assert ("rollout turns" in shown and "0/3" in shown and "active_envs=5" in shown) if tty else shown == ""


def test_a_run_on_a_terminal_shows_its_bars_and_logs_every_number_to_tensorboard(tmp_path, alf_data, monkeypatch):
    """--logger tensorboard: every number of every metrics.jsonl line (the iteration and both validations) is a
    scalar of the same name at its iteration or update count, read back with TensorBoard's event reader; on a
    terminal, bars over the rollout's turns (with the active envs) and each update's steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tiny, run = str(tmp_path / "tiny"), str(tmp_path / "run")
    demo.build_tiny(tiny, demo.game_texts(alf_data), seed=6)
    err = terminal(monkeypatch, True)
    hiper.main(["--model", tiny, "--data_dir", alf_data, "--run_dir", run, "--n_envs", "2", "--max_turns", "2",
                "--max_new_tokens", "16", "--iters", "1", "--eval_every", "1", "--env_workers", "1",
                "--logger", "tensorboard"])
    assert all(bar in err.getvalue() for bar in ("rollout turns", "active_envs=", "critic steps", "actor steps"))
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [x.get("iteration", x.get("updates")) for x in lines] == [0, 1, 1]
    events = EventAccumulator(os.path.join(run, "tensorboard")).Reload()
    logged = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    numbers = {(k, x.get("iteration", x.get("updates"))): v for x in lines for k, v in x.items()
               if isinstance(v, (int, float))}
    assert {("success", 1), ("kl", 1), ("valid_seen/success", 0), ("valid_unseen/success_128", 1)} <= set(numbers)
    assert logged == pytest.approx(numbers, rel=1e-6)  # fp32 in the event file
    assert not any(tag.endswith("/wins") for tag, _ in logged)  # lists are not scalars


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_a_logger_without_its_package_stops_before_any_model(tmp_path, monkeypatch, logger):
    for name in ("wandb", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=f"--logger {logger} needs the {logger} package.*pip install {logger}"):
        hiper.main(["--model", "/no/such/model", "--logger", logger, "--run_dir", str(tmp_path)])


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
