"""Benchmark: the environment side of ALFWorld training on generated full-size rooms, in one run.

    python bench_envs.py                 # the paper's iteration shape: 128 envs x 50 turns, 2/4/8 workers; memory
    python bench_envs.py --envs 16 --turns 10 --workers 1 2 --resets 30     # a quick look
    python bench_envs.py --data_dir DIR  # on games already generated (demo.generate_alfworld_games, full-size rooms)

1. Steps: `--envs` envs in an EnvPool, `--turns` turns of random admissible actions (TextWorld's step limit
   off), for each worker count: env steps/s and wall seconds per turn (one pool.step over all envs).
2. Memory: one env resets `--resets` times on games drawn at random (as training draws them), loading each
   new game into its one engine (this code) or into a new engine per game (the code before, which maps a new
   copy of Fast Downward's library per engine): the process RSS as the resets go, and seconds per reset.
"""
import argparse
import json
import os
import random
import tempfile
import time

import demo
import envs


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def steps(data, n, turns, workers):
    pool = envs.EnvPool("alfworld", n, workers, data_dir=data, max_steps=10 ** 6)
    try:
        t0 = time.perf_counter()
        infos = [info for _, info in pool.reset()]
        t_reset = time.perf_counter() - t0
        rngs = [random.Random(i) for i in range(n)]
        t0 = time.perf_counter()
        for _ in range(turns):
            out = pool.step([rngs[i].choice(infos[i]["admissible_actions"]) for i in range(n)])
            infos = [o[4] for o in out]
        t = time.perf_counter() - t0
    finally:
        pool.close()
    return t_reset, n * turns / t, t / turns


def memory(data, resets, engine_per_game):
    """RSS (MB) after every tenth of the resets, in a fresh process (fork) so the runs do not share caches."""
    r, w = os.pipe()
    if os.fork() == 0:
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        from textworld.envs.pddl import PddlEnv
        env = envs.make("alfworld", data_dir=data, seed=0)
        marks, t0 = [], time.perf_counter()
        for k in range(1, resets + 1):
            if engine_per_game:  # what textworld.start builds for every game
                env.env, env.game_file = AlfredInfos(AlfredDemangler(PddlEnv(env.infos))), None
            env.reset()
            if k % (resets // 10) == 0:
                marks.append(rss_mb())
        os.write(w, json.dumps([marks, (time.perf_counter() - t0) / resets]).encode())
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 1 << 16):
        out += chunk
    os.wait()
    return json.loads(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--envs", type=int, default=128)
    p.add_argument("--turns", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--games", type=int, default=8, help="generated games per task type (full-size rooms)")
    p.add_argument("--data_dir", help="play these games instead (generating full-size rooms takes ~30 s a game)")
    p.add_argument("--resets", type=int, default=150)
    a = p.parse_args()
    data = a.data_dir or tempfile.mkdtemp()
    if not a.data_dir:
        demo.generate_alfworld_games(data, a.games, seed=0)
    n_games = len(envs.alfworld_game_files(data, "train"))
    print(f"{a.envs} ALFWorld envs, {a.turns} turns of random admissible actions, {n_games} full-size "
          f"generated games, {os.cpu_count()} CPU cores", flush=True)
    print(f"{'workers':>8} {'reset all (s)':>14} {'steps/s':>9} {'s per turn':>11}")
    for workers in a.workers:
        t_reset, rate, per_turn = steps(data, a.envs, a.turns, workers)
        print(f"{workers:>8} {t_reset:>14.1f} {rate:>9.1f} {per_turn:>11.2f}", flush=True)
    print(f"\none env, {a.resets} resets on games drawn at random from {n_games}: process RSS (MB) "
          f"after each tenth of the resets")
    for label, per_game in (("one engine", False), ("engine per game", True)):
        marks, per_reset = memory(data, a.resets, per_game)
        print(f"{label:>16}: {' '.join(f'{m:.0f}' for m in marks)}  ({per_reset:.2f} s per reset)")


if __name__ == "__main__":
    main()
