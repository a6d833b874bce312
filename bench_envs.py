"""Benchmark: env steps/s of an EnvPool against serial stepping, same envs and actions, one run.

    python bench_envs.py [--n 16] [--workers 2] [--steps 20]
"""
import argparse
import random
import tempfile
import time

import demo
import envs


def run(step_all, reset_all, n, steps):
    obs_infos = reset_all()
    rngs = [random.Random(i) for i in range(n)]
    t0 = time.perf_counter()
    for _ in range(steps):
        actions = [rngs[i].choice(obs_infos[i][-1]["admissible_actions"]) for i in range(n)]
        obs_infos = step_all(actions)
    return n * steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    data = tempfile.mkdtemp()
    demo.generate_alfworld_games(data, 2, seed=0)  # full-size rooms
    serial = [envs.make("alfworld", seed=i, data_dir=data, max_steps=10 ** 6) for i in range(a.n)]
    s = run(lambda acts: [e.step(x) for e, x in zip(serial, acts)], lambda: [e.reset() for e in serial], a.n, a.steps)
    pool = envs.EnvPool("alfworld", a.n, a.workers, data_dir=data, max_steps=10 ** 6)
    q = run(pool.step, pool.reset, a.n, a.steps)
    pool.close()
    print(f"{a.n} ALFWorld envs, {a.steps} steps each: serial {s:.1f} steps/s, "
          f"pool ({a.workers} workers) {q:.1f} steps/s, ratio {q / s:.2f}x")


if __name__ == "__main__":
    main()
