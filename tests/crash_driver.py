"""Runs `hiper.main` and kills its own process with SIGKILL at a chosen point (for tests/test_crash.py):

    python tests/crash_driver.py update N ARGS...    inside the N-th call of hiper.update (mid-iteration)
    python tests/crash_driver.py save N ARGS...      during the N-th torch.save, after half of state.pt is written
    python tests/crash_driver.py rename N ARGS...    right after the N-th checkpoint rename (checkpoint → .prev)
"""
import io
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hiper  # noqa: E402

calls = [0]


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth(real, before=None, after=None, counts=lambda *a, **k: True):
    def wrapped(*a, **k):
        if counts(*a, **k):
            calls[0] += 1
            if calls[0] == n and before:
                before(*a, **k)
        out = real(*a, **k)
        if calls[0] == n and after and counts(*a, **k):
            after()
        return out
    return wrapped


def half_save(obj, path, *a, **k):
    buf = io.BytesIO()
    REAL_SAVE(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
    kill()


REAL_SAVE = torch.save

if __name__ == "__main__":  # env workers start from a forkserver, which imports this file without running it
    point, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if point == "update":
        hiper.update = on_nth(hiper.update, before=lambda *a, **k: kill())
    elif point == "save":
        torch.save = on_nth(torch.save, before=half_save)
    elif point == "rename":
        os.replace = on_nth(os.replace, after=kill, counts=lambda src, dst: src.endswith("checkpoint"))
    hiper.main(args)
