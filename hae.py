"""Hierarchical Advantage Estimation (HAE) of HiPER (Peng et al., ICML 2026, arXiv 2602.16165, Sec. 4), as the
official scripts compute it. Torch only, MIT licence (the hiper project): copy this file into your trainer.
Everything needed to use it is below; "§5 step n" names the steps as the hiper project's METHOD.md does.

Inputs are turn-level tensors of shape [B, T], turns left-aligned per row, `mask` marking each row's
valid prefix. A segment k is the run of turns [b_k, e_k] opened by a boundary (SWITCH) at b_k; the
first turn of a row always opens one. d_k = e_k − b_k + 1, nd_t = 1 − done_t.

  Low level, GAE(γ, λ) inside a segment, bootstrapping at its end to the next segment's V_high:
    v_next_t = v_low_{t+1} (t < e_k) | v_high_{b_{k+1}} (t = e_k) | bootstrap_low (row truncated)
    δ_t = r_t + γ·nd_t·v_next_t − v_low_t
    A_low_t = δ_t + γλ·nd_t·A_low_{t+1}  (carry reset at e_k);   R_low_t = A_low_t + v_low_t
  High level, SMDP GAE over segments (one macro-step per segment, discount γ^{d_k}):
    G_k = Σ_{j=b_k}^{e_k} γ^{j−b_k} r_j
    boot_k = v_high_{b_{k+1}} | bootstrap_high (row truncated) | 0 (done)
    δ_k = G_k + γ^{d_k}·boot_k − v_high_{b_k}
    A_high_k = δ_k + γ^{d_k}·λ_seg·A_high_{k+1};   R_high_k = A_high_k + v_high_{b_k}  (stored at b_k)
  Switch ("termination") head, as the official scripts do it (not the paper's (q−β)·δ form):
    R_term_t = Σ_{j=t}^{e_k} γ^{j−t} r_j + γ^{e_k−t+1}·boot_k;   A_term_t = R_term_t − v_term_t

  Normalisation (step 5), per level and batch-wide over one value per turn, after the returns were formed:
    A ← (A − mean) / (std + 1e−8) over the turns that carry that level (normalize).
  Token assignment (step 4, the trainer's job; Theorem 4.1's q_t gate): a turn's action tokens get A_low, its
  subgoal tokens A_high on segment-start turns only, its switch tokens A_term; the critic's targets are R_*.

Every recursion above is y_t = x_t + c_t·y_{t+1}: the coefficients are built with vectorised ops and
one reverse loop over T does the rest. No host syncs, so the same code runs eagerly, under
torch.compile, or inside a CUDA graph.

Usage:
    boot = self_bootstrap(v_low, v_high, boundary, mask)  # or None: no bootstrap of truncated rows
    adv_low, ret_low, adv_high, ret_high = hae(r, v_low, v_high, boundary, done, mask, boot)
"""
from typing import NamedTuple, Tuple, Union

import torch

Bootstrap = Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class HAE(NamedTuple):
    adv_low: torch.Tensor  # [B, T] A_low on every valid turn
    ret_low: torch.Tensor  # [B, T] R_low = A_low + v_low
    adv_high: torch.Tensor  # [B, T] A_high at each segment's first turn, 0 elsewhere
    ret_high: torch.Tensor  # [B, T] R_high = A_high + v_high at each segment's first turn, 0 elsewhere


def _scan(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y_t = x_t + c_t·y_{t+1} with y_T = 0, turn-major: x, c are [T, ...]."""
    y = torch.empty_like(x)
    nxt = torch.zeros_like(x[0])
    for t in range(x.shape[0] - 1, -1, -1):
        nxt = torch.addcmul(x[t], c[t], nxt, out=y[t])
    return y


def _shift(x: torch.Tensor) -> torch.Tensor:
    """x_{t+1} along the turn dim of a [T, B] tensor, zero (False) past the end."""
    return torch.cat([x[1:], torch.zeros_like(x[:1])])


def segment_starts(boundary: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """b_k as [B, T] flags: boundary turns of the valid prefix; a row's first turn always opens one."""
    start = mask & boundary
    start[:, 0] = mask[:, 0]  # b_0 = 0
    return start


def self_bootstrap(values_low, values_high, boundary, mask):
    """`bootstrap_truncated` (§5): the pair (V_low at a row's last valid turn, V_high at its last segment's
    start), [B] each, for `hae(..., bootstrap=pair)` on rows that end truncated."""
    last = (mask.sum(1) - 1).clamp(min=0)
    seg = torch.where(segment_starts(boundary, mask), torch.arange(mask.shape[1], device=mask.device), 0).amax(1)
    return values_low.gather(1, last[:, None])[:, 0], values_high.gather(1, seg[:, None])[:, 0]


def _segments(rewards, values_high, boundary, done, mask, bootstrap):
    """Turn-major [T, B] segment structure: (r, v_high, mask, start, inner, v_end_low, v_end_high).

    Padded turns are zeroed once here, so garbage (even NaN) beyond a row's valid prefix never leaks.
    """
    if mask is None:
        mask = torch.ones_like(boundary, dtype=torch.bool)
    start = segment_starts(boundary, mask).t()  # b_k, turn-major
    mask, done = mask.t().contiguous(), done.t()  # [T, B]
    m = mask.to(rewards.dtype)
    r = torch.where(mask, rewards.t(), 0.0)
    v_high = torch.where(mask, values_high.t(), 0.0)
    last = mask & ~_shift(mask)  # a row's last valid turn
    seg_end = mask & (last | _shift(start))  # e_k = b_{k+1} − 1, or the last turn
    inner = m - seg_end.to(m.dtype)  # 1 where the carry continues inside the segment
    zero = r.new_zeros(r.shape[1])
    if bootstrap is None:
        boot_low = boot_high = zero
    elif isinstance(bootstrap, torch.Tensor):
        boot_low = boot_high = bootstrap
    else:
        boot_low, boot_high = bootstrap
    # value after e_k: nd·(V_high at the next segment's start, or the truncation bootstrap on the last turn)
    v_high_next = _shift(v_high) * seg_end  # next turn is a segment start wherever seg_end and not last
    trunc = (last & ~done).to(r.dtype)  # truncated row: bootstrap instead of 0
    v_end_low = v_high_next + trunc * boot_low
    v_end_high = v_high_next + trunc * boot_high
    return r, v_high, m, start, inner, v_end_low, v_end_high


def hae(rewards, values_low, values_high, boundary, done, mask=None, bootstrap: Bootstrap = None, *,
        gamma=1.0, lam=1.0, lam_seg=0.95) -> HAE:
    """HAE steps 1–2 on [B, T] turn tensors; see the module docstring for the equations.

    rewards, values_low, values_high: float [B, T] (values_high is read at segment starts only);
    boundary, done, mask: bool [B, T], done True at most on a row's last valid turn; bootstrap: None (0),
    a [B] tensor for both levels, or a pair (for_low, for_high) used where a row's last valid turn is not
    done (truncated episode).
    """
    r, v_high, m, start, inner, v_end_low, v_end_high = _segments(rewards, values_high, boundary, done, mask, bootstrap)
    v_low = torch.where(m > 0, values_low.t(), 0.0)  # [T, B]
    # §5 step 1: δ_t = r_t + γ·v_next_t − v_low_t, v_next = v_low_{t+1} inside, nd·V_high(s_{b_{k+1}}) at e_k
    delta = r + gamma * (_shift(v_low) * inner + v_end_low) - v_low
    # §5 step 2: g_t = r_t + γ·(g_{t+1} | nd·boot_k at e_k), so g_{b_k} = G_k + γ^{d_k}·nd·boot_k
    x_g = r + gamma * v_end_high
    # γ^{d_k}, accumulated backwards as disc_t = γ·(disc_{t+1} | 1 at e_k)
    x_disc = gamma * (m - inner)
    # §5 step 1: A_low_t = δ_t + γλ·A_low_{t+1}, carry reset at e_k (nd_t = 1 inside a segment)
    a_low, g, disc = _scan(torch.stack([delta, x_g, x_disc], 1),
                           torch.stack([gamma * lam * inner, gamma * inner, gamma * inner], 1)).unbind(1)  # [T, B]
    # §5 step 2: δ_k = G_k + γ^{d_k}·nd·boot_k − V_high(s_{b_k}) ; A_high_k = δ_k + γ^{d_k}·λ_seg·A_high_{k+1}
    s = start.to(r.dtype)
    a_high = _scan((g - v_high) * s, torch.where(start, disc * lam_seg, m))  # other turns pass A_high_{k+1} back
    return HAE(*(x.t().contiguous() for x in (a_low, a_low + v_low * m, a_high * s, (a_high + v_high) * s)))


def term_advantage(rewards, values_term, values_high, boundary, done, mask=None, bootstrap: Bootstrap = None, *,
                   gamma=1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """§5 step 3 (official scripts, not the paper): returns (A_term, R_term), [B, T], 0 on invalid turns.

    R_term_t is the discounted return to the segment end plus γ^{e_k−t+1}·boot_k, with the same boot_k
    as the high level (so a pair bootstrap uses its for_high entry).
    """
    r, _, m, _, inner, _, v_end_high = _segments(rewards, values_high, boundary, done, mask, bootstrap)
    # §5 step 3: R_term_t = r_t + γ·(R_term_{t+1} | nd·boot_k at e_k)
    ret = _scan(r + gamma * v_end_high, gamma * inner)  # [T, B]
    adv = ret - torch.where(m > 0, values_term.t(), 0.0)
    return adv.t().contiguous(), ret.t().contiguous()


def normalize(adv: torch.Tensor, select: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """§5 step 5: (A − mean)/(std + eps) over the selected turns (population std), 0 elsewhere."""
    s = select.to(adv.dtype)
    n = s.sum().clamp(min=1)
    mean = (adv * s).sum() / n
    std = (((adv - mean) ** 2 * s).sum() / n).sqrt()
    return (adv - mean) / (std + eps) * s
