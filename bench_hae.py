"""Benchmark: hae.hae against the slow loop of tests/test_hae.py, side by side in one run.

    python bench_hae.py            # CPU, plus CUDA (eager, torch.compile, CUDA graph) when present
"""
import time

import torch

from hae import hae
from tests.test_hae import hae_loop, random_batch


def timed(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    T = 50
    print(f"{'B':>5} {'device':>6} {'variant':>14} {'ms':>9} {'Mturns/s':>9} {'vs loop':>8}")
    for B in (256, 1024, 4096):
        d = random_batch(B, T, seed=0, dtype=torch.float32)
        d["mask"] = torch.ones(B, T, dtype=torch.bool)  # full rows: the worst case for the loop
        d["lengths"] = torch.full((B,), T)
        lists = [d[k].tolist() for k in ("r", "v_low", "v_high", "boundary", "done", "lengths", "boot_low", "boot_high")]
        t_loop = timed(lambda: hae_loop(*lists, 0.99, 0.95, 0.95), reps=1)
        rows = [("cpu", "loop", t_loop)]
        args = [d[k] for k in ("r", "v_low", "v_high", "boundary", "done", "mask")] + [(d["boot_low"], d["boot_high"])]
        rows.append(("cpu", "hae", timed(lambda: hae(*args, gamma=0.99, lam=0.95), reps=20)))
        if torch.cuda.is_available():
            cargs = [a.cuda() for a in args[:-1]] + [tuple(b.cuda() for b in args[-1])]
            rows.append(("cuda", "hae", timed(lambda: hae(*cargs, gamma=0.99, lam=0.95), reps=50)))
            compiled = torch.compile(hae, mode="max-autotune-no-cudagraphs", fullgraph=True)
            rows.append(("cuda", "compile", timed(lambda: compiled(*cargs, gamma=0.99, lam=0.95), reps=50)))
            graphed = torch.compile(hae, mode="reduce-overhead", fullgraph=True)  # compile + CUDA graph
            rows.append(("cuda", "compile+graph", timed(lambda: graphed(*cargs, gamma=0.99, lam=0.95), reps=50)))
        for dev, name, t in rows:
            print(f"{B:>5} {dev:>6} {name:>14} {t * 1e3:>9.3f} {B * T / t / 1e6:>9.2f} {t_loop / t:>7.0f}x")


if __name__ == "__main__":
    main()
