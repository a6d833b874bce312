"""torchrun + FSDP2 on CPU with the gloo backend: 2 processes against 1 process on the same batch, and a
checkpoint written by 2 processes resumed by 1."""
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict

import demo
import envs
import hiper
import plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["<switch>SWITCH</switch><subgoal>find a mug</subgoal><action>go to cabinet 1</action>",
         "<switch>KEEP</switch><subgoal>find a mug</subgoal><action>open cabinet 1</action>",
         "<switch>SWITCH</switch><subgoal>heat the mug</subgoal><action>heat mug 1 with microwave 1</action>",
         "go to desk 1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trajectories(tok):
    """Five episodes of 1–4 turns: wins, a truncation, an invalid turn, KEEP and SWITCH turns."""
    p = tok.apply_chat_template([{"role": "user", "content": "task: put a hot mug in the cabinet"}],
                                add_generation_prompt=True)
    p = list(p["input_ids"] if hasattr(p, "keys") else p)
    trajs = []
    for b, (n, won) in enumerate([(3, True), (2, False), (4, True), (1, False), (4, False)]):
        texts = [TEXTS[(b + t) % len(TEXTS)] for t in range(n)]
        trajs.append([dict(prompt=p[:len(p) - 3 * t], response=tok(x, add_special_tokens=False).input_ids, text=x,
                           valid=x.startswith("<switch>"), won=won and t == n - 1, done=won and t == n - 1,
                           boundary=t == 0 or envs.is_boundary(x), task_type="t") for t, x in enumerate(texts)])
    return trajs


def worker(rank, ws, port, path, out):
    """Score this rank's share of the episodes, gather, advantages, then a critic and an actor update."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ws),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = hiper.Config(device="cpu", microbatch=2, minibatch=7)
    hiper.init_distributed(cfg)
    tok, policy, ref, critic = hiper.load_models(path, path)
    assert rank == 0 or all(p.is_meta for m in (policy, ref, critic) for p in m.parameters())  # only rank 0 reads
    torch.manual_seed(0)
    torch.nn.init.normal_(critic.score.weight, std=0.3)  # distinct heads, so value losses and advantages are not trivial
    init = [{k: v.clone() for k, v in m.state_dict().items()} for m in (policy, critic)]
    hiper.shard("cpu", policy, ref, critic)  # rank 0's weights, the perturbed head included, on every rank
    trajs = hiper.share(trajectories(tok))
    trajs = hiper.gather(hiper.score(cfg, hiper.annotate(cfg, trajs, tok), tok, policy, ref, critic))
    samples = hiper.advantages(cfg, trajs)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-3, eps=1e-4)
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, eps=1e-4)
    c, _ = hiper.update(cfg, critic, critic_opt, samples, hiper.critic_loss, tok.pad_token_id, random.Random(0), 1)
    a, _ = hiper.update(cfg, policy, actor_opt, samples, hiper.actor_loss, tok.pad_token_id, random.Random(1), 1)
    weights = [get_model_state_dict(m, options=plumbing.FULL) for m in (policy, critic)]
    if rank == 0:
        torch.save(dict(adv=[s["adv"] for s in samples], ret=[s["returns"] for s in samples], c=c, a=a,
                        policy=weights[0], critic=weights[1], init=init), out)
    if ws > 1:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    demo.build_tiny(str(d / "tiny"), TEXTS * 5)
    for ws in (1, 2):
        mp.spawn(worker, args=(ws, free_port(), str(d / "tiny"), str(d / f"ws{ws}.pt")), nprocs=ws)
    return [torch.load(d / f"ws{ws}.pt", weights_only=False) for ws in (1, 2)]


def test_global_advantage_normalisation_equals_one_process(runs):
    one, two = runs
    assert len(one["adv"]) == 14 and any(a.abs().sum() > 0 for a in one["adv"])
    for x, y in zip(one["adv"] + one["ret"], two["adv"] + two["ret"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_two_processes_give_the_same_losses_and_weights_as_one(runs):
    one, two = runs
    torch.testing.assert_close(one["c"], two["c"], rtol=1e-4, atol=1e-6)  # value loss per head
    torch.testing.assert_close(one["a"], two["a"], rtol=1e-4, atol=1e-6)  # policy loss, KL, entropy, clip fraction
    for i, key in enumerate(("policy", "critic")):
        for k, w in one[key].items():
            torch.testing.assert_close(w, two[key][k], rtol=1e-4, atol=2e-5)
        moved = [k for k, w in one[key].items() if (w - one["init"][i][k]).abs().max() > 1e-4]
        assert len(moved) > len(one[key]) // 2  # the update did move the weights


def test_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    data = str(tmp_path / "alf")
    demo.generate_alfworld_games(data, 1, seed=1, split="train", max_receptacles=6, n_distractors=2)
    run = str(tmp_path / "run")
    demo.build_tiny(str(tmp_path / "tiny"), demo.game_texts(data), seed=6)
    args = ["--model", str(tmp_path / "tiny"), "--data_dir", data, "--n_envs", "4", "--max_turns", "3",
            "--max_new_tokens", "24", "--eval_every", "0", "--minibatch", "8", "--microbatch", "2",
            "--env_workers", "1", "--save_every", "1", "--actor_lr", "1e-3", "--critic_lr", "1e-3", "--run_dir", run]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "hiper.py", *args, "--iters", "1"], cwd=ROOT, env=env, check=True)
    saved = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)
    assert saved["iteration"] == 1 and json.load(open(os.path.join(run, "config.json")))["world_size"] == 2
    tok, policy, ref, critic = hiper.load_models(os.path.join(run, "checkpoint", "policy"), str(tmp_path / "tiny"))
    assert {k: v.shape for k, v in critic.state_dict().items()} == {k: v.shape for k, v in saved["critic"].items()}
    opt = torch.optim.AdamW(critic.parameters())
    critic.load_state_dict(saved["critic"])
    set_optimizer_state_dict(critic, opt, saved["critic_opt"], options=plumbing.FULL)
    back = get_optimizer_state_dict(critic, opt, options=plumbing.FULL)["state"]
    for k, v in saved["critic_opt"]["state"].items():  # full (unsharded) Adam moments, restored exactly
        assert v["exp_avg"].shape == critic.state_dict()[k].shape and torch.equal(back[k]["exp_avg"], v["exp_avg"])
    hiper.main(args + ["--iters", "2", "--resume"])
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [x["iteration"] for x in lines] == [1, 2]
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["iteration"] == 2
