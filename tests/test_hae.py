"""hae.py against a slow loop that reads like METHOD.md §5, hand-worked cases and a Monte-Carlo check."""
import math
import random

import pytest
import torch

from hae import hae, normalize, self_bootstrap, term_advantage


def hae_loop(r, v_low, v_high, boundary, done, lengths, boot_low, boot_high, gamma, lam, lam_seg, v_term=None):
    """METHOD.md §5 steps 1–3, one row, one segment, one turn at a time, on Python lists."""
    B, T = len(r), len(r[0])
    out = {k: [[0.0] * T for _ in range(B)] for k in ("adv_low", "ret_low", "adv_high", "ret_high", "adv_term", "ret_term")}
    for b in range(B):
        n = lengths[b]
        starts = [0] + [t for t in range(1, n) if boundary[b][t]]
        ends = [s - 1 for s in starts[1:]] + [n - 1]
        nd_end = 0.0 if done[b][n - 1] else 1.0
        a_high_next = 0.0
        for k in reversed(range(len(starts))):
            bk, ek = starts[k], ends[k]
            last_seg = k == len(starts) - 1
            nd = nd_end if last_seg else 1.0
            # boot_k: next segment's V_high, truncation bootstrap, or 0 after done
            boot = (boot_high[b] if last_seg else v_high[b][starts[k + 1]]) * nd
            boot_l = (boot_low[b] if last_seg else v_high[b][starts[k + 1]]) * nd
            # step 1: low-level GAE with the carry reset at e_k
            a = 0.0
            for t in range(ek, bk - 1, -1):
                v_next = v_low[b][t + 1] if t < ek else boot_l
                delta = r[b][t] + gamma * v_next - v_low[b][t]
                a = delta + (gamma * lam * a if t < ek else 0.0)
                out["adv_low"][b][t] = a
                out["ret_low"][b][t] = a + v_low[b][t]
                # step 3: discounted return to the segment end plus the bootstrap
                ret = sum(gamma ** (j - t) * r[b][j] for j in range(t, ek + 1)) + gamma ** (ek - t + 1) * boot
                out["ret_term"][b][t] = ret
                if v_term is not None:
                    out["adv_term"][b][t] = ret - v_term[b][t]
            # step 2: SMDP GAE over segments
            d = ek - bk + 1
            g_seg = sum(gamma ** (j - bk) * r[b][j] for j in range(bk, ek + 1))
            delta_k = g_seg + gamma ** d * boot - v_high[b][bk]
            a_high_next = delta_k + gamma ** d * lam_seg * a_high_next
            out["adv_high"][b][bk] = a_high_next
            out["ret_high"][b][bk] = a_high_next + v_high[b][bk]
    return out


def random_batch(B, T, seed, dtype, p_switch=0.3, p_done=0.5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    r = torch.where(torch.rand(B, T, generator=g) < 0.2, torch.randn(B, T, generator=g), torch.zeros(B, T))
    v_low, v_high, v_term = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    boundary = torch.rand(B, T, generator=g) < p_switch
    is_done = torch.rand(B, generator=g) < p_done
    done = (torch.arange(T)[None, :] == (lengths - 1)[:, None]) & is_done[:, None]
    boot_low, boot_high = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    # garbage (NaN) beyond each row's valid prefix must not leak into the result
    nan = float("nan")
    r, v_low, v_high, v_term = (torch.where(mask, x.double(), nan).to(dtype) for x in (r, v_low, v_high, v_term))
    return dict(r=r, v_low=v_low, v_high=v_high, v_term=v_term, boundary=boundary, done=done, mask=mask,
                lengths=lengths, boot_low=boot_low.to(dtype), boot_high=boot_high.to(dtype))


def run_both(d, gamma, lam, lam_seg):
    res = hae(d["r"], d["v_low"], d["v_high"], d["boundary"], d["done"], d["mask"], (d["boot_low"], d["boot_high"]),
              gamma=gamma, lam=lam, lam_seg=lam_seg)
    adv_term, ret_term = term_advantage(d["r"], d["v_term"], d["v_high"], d["boundary"], d["done"], d["mask"],
                                        (d["boot_low"], d["boot_high"]), gamma=gamma)
    ref = hae_loop(*(d[k].tolist() for k in ("r", "v_low", "v_high", "boundary", "done", "lengths", "boot_low", "boot_high")),
                   gamma, lam, lam_seg, v_term=d["v_term"].tolist())
    got = dict(res._asdict(), adv_term=adv_term, ret_term=ret_term)
    return got, {k: torch.tensor(v, dtype=d["r"].dtype) for k, v in ref.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,lam,lam_seg", [(1.0, 1.0, 0.95), (0.99, 0.95, 0.9), (0.9, 0.0, 1.0), (0.5, 0.7, 0.0)])
@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_on_random_batches(dtype, gamma, lam, lam_seg, seed):
    d = random_batch(B=24, T=random.Random(seed).randint(1, 30), seed=seed, dtype=dtype)
    got, ref = run_both(d, gamma, lam, lam_seg)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for k in ref:
        assert got[k].dtype == dtype
        torch.testing.assert_close(got[k], ref[k], **tol, msg=k)


def one_row(r, v_low, v_high, switch, done_last, bootstrap=None, **kw):
    T = len(r)
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    done = torch.zeros(1, T, dtype=torch.bool)
    done[0, -1] = done_last
    return hae(t(r), t(v_low), t(v_high), torch.tensor([switch]), done, None, bootstrap, **kw)


def test_worked_example():
    """METHOD.md §5, the worked example: one trajectory, 5 turns, S K S K K, done at t=4."""
    r = [0, 0, -0.1, 0, 10]
    v_low = [1, 2, 3, 4, 5]
    v_high = [0.5, 99.0, 2.5, 99.0, 99.0]  # read only at segment starts
    switch = [True, False, True, False, False]
    out = one_row(r, v_low, v_high, switch, True, gamma=1.0, lam=1.0, lam_seg=0.95)
    assert out.adv_low[0].tolist() == pytest.approx([1.5, 0.5, 6.9, 6.0, 5.0])
    assert out.ret_low[0].tolist() == pytest.approx([2.5, 2.5, 9.9, 10, 10])
    assert out.adv_high[0].tolist() == pytest.approx([9.03, 0, 7.4, 0, 0])
    assert out.ret_high[0].tolist() == pytest.approx([9.53, 0, 9.9, 0, 0])
    adv_term, ret_term = term_advantage(torch.tensor([r], dtype=torch.float64), torch.ones(1, 5, dtype=torch.float64),
                                        torch.tensor([v_high]), torch.tensor([switch]),
                                        torch.tensor([[False] * 4 + [True]]))
    assert ret_term[0].tolist() == pytest.approx([2.5, 2.5, 9.9, 10, 10])
    assert adv_term[0].tolist() == pytest.approx([1.5, 1.5, 8.9, 9.0, 9.0])


def test_first_turn_is_always_a_boundary():
    a = one_row([1.0, 2.0], [0.1, 0.2], [0.3, 0.4], [False, False], True)
    b = one_row([1.0, 2.0], [0.1, 0.2], [0.3, 0.4], [True, False], True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a.adv_high[0, 0].item() == pytest.approx(3.0 - 0.3)


def test_single_turn():
    out = one_row([2.0], [0.5], [0.25], [True], True)
    assert out.adv_low.item() == pytest.approx(1.5) and out.ret_low.item() == pytest.approx(2.0)
    assert out.adv_high.item() == pytest.approx(1.75) and out.ret_high.item() == pytest.approx(2.0)
    # truncated: low bootstraps from its own entry, high from its own
    out = one_row([2.0], [0.5], [0.25], [True], False, (torch.tensor([1.0]), torch.tensor([3.0])), gamma=0.5)
    assert out.adv_low.item() == pytest.approx(2.0 + 0.5 * 1.0 - 0.5)
    assert out.adv_high.item() == pytest.approx(2.0 + 0.5 * 3.0 - 0.25)


def plain_gae(r, v, gamma, lam, v_last):
    adv, a = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        v_next = v[t + 1] if t + 1 < len(r) else v_last
        a = r[t] + gamma * v_next - v[t] + gamma * lam * a
        adv[t] = a
    return adv


def test_one_segment_is_plain_gae():
    rng = random.Random(0)
    r, v = [rng.gauss(0, 1) for _ in range(12)], [rng.gauss(0, 1) for _ in range(12)]
    out = one_row(r, v, [0.7] + [0.0] * 11, [True] + [False] * 11, False, torch.tensor([1.3], dtype=torch.float64), gamma=0.9, lam=0.8)
    assert out.adv_low[0].tolist() == pytest.approx(plain_gae(r, v, 0.9, 0.8, 1.3))
    # one segment at the high level: A_high = G + γ^d·boot − V_high(s_0)
    g_seg = sum(0.9 ** j * r[j] for j in range(12)) + 0.9 ** 12 * 1.3
    assert out.adv_high[0, 0].item() == pytest.approx(g_seg - 0.7)


def test_every_turn_a_boundary():
    """Each segment is one turn: low level is one-step TD to V_high; high level is GAE(γ, λ_seg) on V_high."""
    rng = random.Random(1)
    r, v_low, v_high = ([rng.gauss(0, 1) for _ in range(8)] for _ in range(3))
    out = one_row(r, v_low, v_high, [True] * 8, True, gamma=0.95, lam=0.5, lam_seg=0.8)
    v_next = v_high[1:] + [0.0]
    assert out.adv_low[0].tolist() == pytest.approx([r[t] + 0.95 * v_next[t] - v_low[t] for t in range(8)])
    assert out.adv_high[0].tolist() == pytest.approx(plain_gae(r, v_high, 0.95, 0.8, 0.0))


def test_gamma_lam_one_is_monte_carlo():
    """γ = λ = λ_seg = 1 and done: R_low is the return to the segment end + V_high of the next start; R_high at
    each start is the Monte-Carlo return to the episode end."""
    rng = random.Random(2)
    r = [rng.choice([0.0, 0.0, 1.0, -0.1]) for _ in range(10)]
    v_low, v_high = [rng.gauss(0, 1) for _ in range(10)], [rng.gauss(0, 1) for _ in range(10)]
    switch = [True, False, False, True, False, True, True, False, False, False]
    out = one_row(r, v_low, v_high, switch, True, gamma=1.0, lam=1.0, lam_seg=1.0)
    starts = [t for t in range(10) if switch[t]]
    for t in range(10):
        nxt = min([s for s in starts if s > t], default=10)
        expect = sum(r[t:nxt]) + (v_high[nxt] if nxt < 10 else 0.0)
        assert out.ret_low[0, t].item() == pytest.approx(expect)
        assert out.ret_high[0, t].item() == pytest.approx(sum(r[t:]) if switch[t] else 0.0)


def test_scalar_and_missing_bootstrap():
    d = random_batch(B=16, T=10, seed=3, dtype=torch.float64, p_done=0.0)
    args = (d["r"], d["v_low"], d["v_high"], d["boundary"], d["done"], d["mask"])
    one = hae(*args, d["boot_high"])
    pair = hae(*args, (d["boot_high"], d["boot_high"]))
    zero = hae(*args, None)
    zeros = hae(*args, (torch.zeros(16, dtype=torch.float64),) * 2)
    for a, b, c, e in zip(one, pair, zero, zeros):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, e)


def test_normalize_is_per_selected_turn():
    adv = torch.tensor([[1.0, 2.0, 100.0], [3.0, 0.0, -50.0]])
    sel = torch.tensor([[True, True, False], [True, False, False]])
    out = normalize(adv, sel)
    vals = torch.tensor([1.0, 2.0, 3.0])
    expect = (vals - vals.mean()) / (vals.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(out[sel], expect)
    assert out[~sel].abs().sum() == 0


def test_compiles():
    """No host syncs: the same function runs under torch.compile(fullgraph=True)."""
    d = random_batch(B=8, T=6, seed=4, dtype=torch.float32)
    args = (d["r"], d["v_low"], d["v_high"], d["boundary"], d["done"], d["mask"], (d["boot_low"], d["boot_high"]))
    eager = hae(*args)
    compiled = torch.compile(hae, fullgraph=True, backend="eager")(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_high_level_unbiased_by_monte_carlo():
    """Exact critic ⇒ E[A_high | s_{b_k}] = 0 and E[R_high] = V(s_0), for any λ_seg.

    MDP: horizon H, reward at step t ~ Bernoulli(p_t)·w_t, random SWITCH decisions independent of the
    future; then V_high(s_t) = V_low(s_t) = Σ_{j≥t} γ^{j−t} p_j w_j. A wrong γ^{d} or boundary bootstrap
    shifts the mean by several standard errors; a biased critic is detected too."""
    H, N, gamma = 8, 40000, 0.8
    g = torch.Generator().manual_seed(5)
    p = torch.rand(H, generator=g, dtype=torch.float64)
    w = torch.randn(H, generator=g, dtype=torch.float64) * 3
    v = torch.tensor([sum(gamma ** (j - t) * (p[j] * w[j]).item() for j in range(t, H)) for t in range(H)],
                     dtype=torch.float64)
    r = (torch.rand(N, H, generator=g, dtype=torch.float64) < p) * w
    boundary = torch.rand(N, H, generator=g) < 0.4
    done = torch.zeros(N, H, dtype=torch.bool)
    done[:, -1] = True
    vv = v.expand(N, H)
    for exact in (True, False):
        critic = vv if exact else vv + 1.0
        out = hae(r, critic, critic, boundary, done, gamma=gamma, lam=1.0, lam_seg=0.7)
        starts = out.adv_high[:, 3][boundary[:, 3]]  # A_high at segments starting at t = 3
        for x in (out.adv_high[:, 0], starts, out.adv_low[:, 5]):
            z = x.mean() / (x.std() / math.sqrt(len(x)))
            assert (abs(z) < 4) == exact, (exact, z)
        if exact:
            se = out.ret_high[:, 0].std() / math.sqrt(N)
            assert abs(out.ret_high[:, 0].mean() - v[0]) < 4 * se


@pytest.mark.parametrize("seed", range(4))
def test_self_bootstrap_reads_the_last_turn_and_the_last_segment_start(seed):
    """Loop reference: V_low at each row's last valid turn; V_high at the last turn t ≤ last with a SWITCH, or
    at turn 0 (which always opens a segment, SWITCH or not)."""
    d = random_batch(6, 9, seed, torch.float64)
    boundary = d["boundary"].clone()
    boundary[:, 0] = False  # the rule must not depend on turn 0's flag
    got_low, got_high = self_bootstrap(d["v_low"], d["v_high"], boundary, d["mask"])
    for b in range(6):
        last = int(d["mask"][b].sum()) - 1
        start = max([t for t in range(1, last + 1) if boundary[b, t]], default=0)
        assert got_low[b] == d["v_low"][b, last] and got_high[b] == d["v_high"][b, start]
