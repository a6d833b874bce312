"""Benchmark: the update's cost against the rollout's, on one rollout of the ALFWorld demo (its warm start, games and
settings), side by side in one run: the passes after the rollout (scoring, one critic epoch, one actor epoch) with
turns batched in arrival order and micro-batches of 16, and with turns batched by length and micro-batches of 8
(train.sh's demo). Both give the same log-probs, values and gradient (tests/test_hiper.py); each variant is timed
twice, alternating, on fresh copies of the critic and the policy.

    bash train.sh && python bench_update.py         # after the demo's kit (runs/demo/warm-start, data/alfworld)
"""
import argparse
import copy
import dataclasses
import random
import time

import torch

import hiper


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/demo/warm-start")
    p.add_argument("--data_dir", default="data/alfworld")
    p.add_argument("--n_envs", type=int, default=32)
    a = p.parse_args()
    cfg = hiper.parse_config(["--model", a.model, "--data_dir", a.data_dir, "--n_envs", str(a.n_envs), "--history", "1",
                              "--max_turns", "20", "--env_max_steps", "20", "--max_new_tokens", "40",
                              "--minibatch", "16", "--adam_eps", "1e-2", "--actor_lr", "1e-3", "--critic_lr", "2e-3",
                              "--value_clip", "10", "--env_workers", "1"])
    torch.manual_seed(0)
    tok, policy, ref, critic = hiper.load_models(cfg.model, cfg.model, "cpu", False, cfg.seed)
    pool = hiper.env_pool(cfg, cfg.n_envs, "train", cfg.seed)
    games = [random.Random(cfg.seed).randrange(hiper.envs.env_class(cfg.env).n_games(cfg.data_dir, "train"))
             for _ in range(cfg.n_envs)]
    t0 = time.perf_counter()
    seeds = [hiper.mix(cfg.seed, 0, i) for i in range(cfg.n_envs)]
    trajs = hiper.rollout(cfg, policy, tok, pool, cfg.temperature, seeds, games)
    rollout_s = time.perf_counter() - t0
    pool.close()
    hiper.annotate(cfg, trajs, tok)
    turns = [s for tr in trajs for s in tr]
    by_length, times = hiper.length, {}
    for variant, micro in [("arrival order, micro-batch 16", 16), ("by length, micro-batch 8", 8)] * 2:
        hiper.length = by_length if micro == 8 else (lambda turn: 0)  # a constant key: sorted() keeps arrival order
        c = dataclasses.replace(cfg, microbatch=micro)
        for s in turns:
            s.pop("ref_logp", None), s.pop("values", None)
        t0 = time.perf_counter()
        hiper.score(c, trajs, tok, policy, ref, critic)
        samples = hiper.advantages(c, trajs)
        for model, loss, lr in ((copy.deepcopy(critic), hiper.critic_loss, c.critic_lr),
                                (copy.deepcopy(policy), hiper.actor_loss, c.actor_lr)):
            opt = torch.optim.AdamW(model.parameters(), lr, eps=c.adam_eps)
            hiper.update(c, model, opt, samples, loss, tok.pad_token_id, random.Random(1), 1)
        times.setdefault(variant, []).append(time.perf_counter() - t0)
    hiper.length = by_length
    print(f"one rollout: {len(trajs)} episodes, {len(turns)} turns, {rollout_s:.1f} s ({torch.get_num_threads()} "
          "torch threads)")
    print("| batching | update (s), two runs | update / rollout |\n|---|---|---:|")
    for variant, ts in times.items():
        print(f"| {variant} | {ts[0]:.1f}, {ts[1]:.1f} | {min(ts) / rollout_s:.2f} |")


if __name__ == "__main__":
    main()
