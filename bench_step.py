"""Benchmark: one HiPER training step at real size — HF generation, `score` + `advantages` (old/ref log-probs, values,
HAE), one critic and one actor minibatch update — through hiper.py's own functions, with random weights in
a Qwen2.5 shape (built from its config: no download) and synthetic prompts of `--prompt` tokens.

    python bench_step.py                              # tiny shape, CPU
    python bench_step.py --size 1.5b --gc             # Qwen2.5-1.5B shape on GPU, gradient checkpointing
"""
import argparse
import random
import tempfile
import time

import torch

import demo
import envs
import hiper

SHAPES = {  # Qwen2.5-Instruct configs (hidden, intermediate, layers, heads, kv heads, vocab); tiny: hiper.build_tiny
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", choices=SHAPES)
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--prompt", type=int, default=1000, help="prompt tokens per turn")
    p.add_argument("--response", type=int, default=128, help="response tokens per turn")
    p.add_argument("--turns", type=int, default=256, help="turn samples: one minibatch (§9)")
    p.add_argument("--gen_batch", type=int, default=64)
    p.add_argument("--gen_tokens", type=int, default=256)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    path = tempfile.mkdtemp()
    demo.build_tiny(path, [envs.FORMAT_RULES, envs.SUBGOAL_RULES] * 10)  # tokenizer (and a tiny model)
    if a.size != "tiny":
        hidden, inter, layers, heads, kv, vocab = SHAPES[a.size]
        tok = AutoTokenizer.from_pretrained(path)
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                          tie_word_embeddings=a.size == "1.5b", eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        with torch.device(device):
            Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
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
    answer = tok("<switch>SWITCH</switch><subgoal>find the apple</subgoal><action>go to countertop 1</action>").input_ids
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
    samples, t_prep = timed(lambda: hiper.advantages(hc, hiper.score(hc, trajs, tok, policy, ref, critic)))
    (_, t_span) = timed(lambda: [hiper.token_spans(tok, s["response"]) for s in samples])
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=hc.actor_lr, weight_decay=hc.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=hc.critic_lr, weight_decay=hc.weight_decay)
    _, t_crit = timed(lambda: hiper.update(hc, critic, critic_opt, samples, hiper.critic_loss, tok.pad_token_id, rng, 1))
    _, t_act = timed(lambda: hiper.update(hc, policy, actor_opt, samples, hiper.actor_loss, tok.pad_token_id, rng, 1))
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
    print(f"peak memory {hiper.peak_memory_gb():.1f} GiB ({'GPU allocated' if device.type == 'cuda' else 'CPU RSS'})")


if __name__ == "__main__":
    main()
