"""Dense Adam's movement of a row over the steps it skipped, computed in one go.

Under torch.optim.Adam on a dense table a row whose gradient is zero in steps s+1..t still moves:
per step j (k = j - s steps after its last gradient) torch computes, in float32,

    m_j = b1 m_{j-1},  v_j = b2 v_{j-1},  theta -= ss_j m_j / (sqrt(v_j) / bsq_j + eps)

with ss_j = lr_j / (1 - beta1^j) and bsq_j = sqrt(1 - beta2^j). So with sigma = sqrt(v_s) the
movement is  -m_s sum_k ss_j b1^k / (b2^(k/2) sigma / bsq_j + eps).  Expanding the fraction in
x = eps bsq_j / (b2^(k/2) sigma) (small for any gradient well above eps) splits it into per-row
scalars times per-element powers of 1/sigma:

    movement = -(m_s / sigma) sum_p (-eps / sigma)^p W_p,  W_p = sum_k ss_j bsq_j^(p+1) rho_p^k,
    rho_p = b1 / b2^((p+1)/2),

so a catch-up costs a few array operations per row element whatever the gap, plus a cumulative
sum per distinct last step. Elements where the series converges too slowly (sigma within ~7x of
eps at the horizon, or v = 0 with m != 0) take the exact step-by-step loop instead.

The horizon: after k steps the remaining movement is at most ss_max (|m|/sigma)_max rho_0^(k+1) /
(1 - rho_0) (each term is at most ss_j b1^k |m| / (b2^(k/2) sigma), bsq_j <= 1), and also at most
ss_max (|m|/eps)_max b1^(k+1) / (1 - b1) (the denominator is at least eps). Once that is below
2^-26 of the row's largest |value| it is below a quarter of that element's float32 ulp: float32
cannot represent it relative to the row, and torch's own float32 steps drop such moves (a move
under half an ulp leaves the value unchanged), so stopping there is exact to float32. Series
terms are kept until the tail's bound is below 2^-30 of the movement (see _series).

The sums run in float64 and round once to float32, so a caught-up row is at least as close to the
real-number Adam trajectory as torch's own 150 rounded steps; tests/memory_service/storage/test_dense_adam.py measures the
agreement with torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from memory_service.native import kernels

HORIZON = 2.0**-26  # movement below this fraction of the row's largest |value| is not representable
TRUNCATION = 2.0**-30  # allowed relative error of the truncated series
MAX_TERMS = 12
X_LIMIT = 0.15  # x <= 0.15: 12 terms always reach TRUNCATION (0.15^12 / 0.85 < 2^-30)
_TINY = float(np.finfo(np.float32).tiny)
# The most the step sizes of an adam table may add up to, times moment_ratio: a row starts small
# and moves, over all its updates and catch-ups, by at most that, so it stays in float32's range.
MAX_MOVEMENT = float(np.finfo(np.float32).max) / 4


@dataclass(frozen=True)
class AdamDecay:
    """The per-step factors torch applies in float32: m decays by b1 (lerp towards 0 with weight
    float32(1 - beta1)), v by b2 = float32(beta2); eps = float32(eps)."""

    b1: float
    b2: float
    eps: float

    @classmethod
    def of(cls, beta1: float, beta2: float, eps: float) -> "AdamDecay":
        return cls(1.0 - float(np.float32(1.0 - beta1)), float(np.float32(beta2)), float(np.float32(eps)))


@dataclass
class CatchUpStats:
    rows: int = 0  # rows brought up to date
    series_elements: int = 0
    loop_elements: int = 0  # elements that took the step-by-step loop


def catch_up(rows: np.ndarray, m: np.ndarray, v: np.ndarray, last: np.ndarray, target: int,
             ss: np.ndarray, bsq: np.ndarray, decay: AdamDecay, stats: CatchUpStats) -> None:
    """Brings rows last updated at steps `last` (n,) up to step `target`, in place.

    rows, m, v: (n, w) float32 (gathered copies); ss, bsq: (target + 1,) float64 per-step step
    size and bias-correction root, as torch rounds them to float32.
    """
    select = last < target  # (n,) rows to work on
    if select.all():
        select = m.any(axis=1)  # rows with m = 0 do not move: v decays, the step advances
        if not select.all():
            still = np.flatnonzero(~select)
            v[still] *= (decay.b2 ** (target - last[still]).astype(np.float64))[:, None]
            last[still] = target
    if not select.all():  # gather the rows to work on
        idx = np.flatnonzero(select)
        if idx.size:
            r, mm, vv, ll = rows[idx], m[idx], v[idx], last[idx]
            catch_up(r, mm, vv, ll, target, ss, bsq, decay, stats)
            rows[idx], m[idx], v[idx], last[idx] = r, mm, vv, ll
        return
    steps = _horizon(np.abs(rows).max(axis=1), m, last, target, ss, decay)  # (n,)
    inv = np.sqrt(v, dtype=np.float64)  # (n, w) sigma, then 1 / sigma
    with np.errstate(divide="ignore"):
        np.divide(1.0, inv, out=inv)
    # bound of the series ratio x over a row's elements and steps (bsq <= 1)
    x_row = decay.eps * inv.max(axis=1) / decay.b2 ** (steps / 2)  # (n,)
    series = x_row <= X_LIMIT
    if series.all():
        delta = _series(m, inv, last, steps, x_row, ss, bsq, decay)  # (n, w) float64
        stats.series_elements += m.size
    else:
        delta = np.zeros(m.shape)
        rs = np.flatnonzero(series)
        if rs.size:
            delta[rs] = _series(m[rs], inv[rs], last[rs], steps[rs], x_row[rs], ss, bsq, decay)
            stats.series_elements += m[rs].size
        rs = np.flatnonzero(~series)
        delta[rs] = _mixed(m[rs], inv[rs], last[rs], steps[rs], ss, bsq, decay, stats)
    delta += rows
    rows[...] = delta  # the one rounding to float32
    gap = (target - last).astype(np.float64)  # (n,)
    np.multiply(m, (decay.b1**gap)[:, None], out=m, casting="unsafe")  # float64 product, one rounding
    np.multiply(v, (decay.b2**gap)[:, None], out=v, casting="unsafe")
    last[...] = target
    stats.rows += len(last)


def moment_ratio(decay: AdamDecay) -> float | None:
    """A bound of |m| / sqrt(v) over any gradient history (Cauchy-Schwarz on the two moving
    averages; catch-up only shrinks it), with slack for rounding; None where b1^2 >= b2 (no bound:
    |m| / eps bounds each move instead)."""
    b1, b2 = decay.b1, decay.b2
    if b1 * b1 >= b2:
        return None
    return 1.001 * (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


def catch_up_state(rows: np.ndarray, state: np.ndarray, last: np.ndarray, target: int, ss: np.ndarray,
                   bsq: np.ndarray, decay: AdamDecay, stats: CatchUpStats, at: np.ndarray | None = None) -> None:
    """`catch_up` through the compiled loops, bit-identical to it, on state (n, 2w) = [m, v] in
    place (no copies of its halves), or with `at` (k,) on those distinct rows of arenas rows,
    state, last (in place: no gather, no scatter). The same row selection, horizon and series
    coefficients (per-row scalars, numpy); the per-element series and decay in one pass per row
    (C); rows beyond the series' reach (sigma near eps) as `catch_up` moves them."""
    w = rows.shape[1]
    at = np.arange(len(last)) if at is None else at  # (k,) rows to bring up to date
    if not len(at):
        return
    behind = last[at] < target  # (k,)
    if not behind.all():  # only rows behind move
        catch_up_state(rows, state, last, target, ss, bsq, decay, stats, at[behind])
        return
    theta_max, inv_max, moves = kernels.adam_row_stats(rows, state, at)  # (k,) each
    if not moves.all():  # rows with m = 0 do not move: v decays, the step advances
        still = at[~moves]
        v = state[still, w:]
        v *= (decay.b2 ** (target - last[still]).astype(np.float64))[:, None]
        state[still, w:] = v
        last[still] = target
        at, theta_max, inv_max = at[moves], theta_max[moves], inv_max[moves]
        if not len(at):
            return
    ll = last[at]  # (k,)
    steps = _horizon(theta_max, state[at, :w], ll, target, ss, decay)  # (k,)
    x_row = decay.eps * inv_max / decay.b2 ** (steps / 2)  # (k,)
    series = x_row <= X_LIMIT
    if series.all():
        _series_native(rows, state, at, ll, steps, x_row, inv_max, target, ss, bsq, decay)
    else:  # each row moves alone: the series rows in C, the others as catch_up moves them
        rs = np.flatnonzero(series)
        if rs.size:
            _series_native(rows, state, at[rs], ll[rs], steps[rs], x_row[rs], inv_max[rs], target, ss, bsq, decay)
        rs = np.flatnonzero(~series)
        r, st = rows[at[rs]], state[at[rs]]
        _mixed_rows(r, st, ll[rs], steps[rs], target, ss, bsq, decay, stats)
        rows[at[rs]], state[at[rs]] = r, st
    stats.series_elements += int(np.count_nonzero(series)) * w
    last[at] = target
    stats.rows += len(at)


def _series_native(rows: np.ndarray, state: np.ndarray, at: np.ndarray, last: np.ndarray, steps: np.ndarray,
                   x_row: np.ndarray, inv_max: np.ndarray, target: int, ss: np.ndarray, bsq: np.ndarray,
                   decay: AdamDecay) -> None:
    """catch_up's series branch on the rows `at` (r,) of rows, state, in place: coefficients per
    row (numpy), the movement and the moments' decay per element (C); last (r,): their steps."""
    coef = np.stack(_series_coefs(inv_max, last, steps, x_row, ss, bsq, decay), axis=1)  # (r, P)
    gap = (target - last).astype(np.float64)  # (r,)
    kernels.adam_catch_up_series(rows, state, at, coef, decay.b1**gap, decay.b2**gap)


def _mixed_rows(rows: np.ndarray, state: np.ndarray, last: np.ndarray, steps: np.ndarray, target: int,
                ss: np.ndarray, bsq: np.ndarray, decay: AdamDecay, stats: CatchUpStats) -> None:
    """catch_up's branch for rows beyond the series' reach, on rows (r, w), state (r, 2w) in place."""
    w = rows.shape[1]
    m, v = state[:, :w].copy(), state[:, w:].copy()  # (r, w) each
    inv = np.sqrt(v, dtype=np.float64)
    with np.errstate(divide="ignore"):
        np.divide(1.0, inv, out=inv)
    delta = _mixed(m, inv, last, steps, ss, bsq, decay, stats)
    delta += rows
    rows[...] = delta
    gap = (target - last).astype(np.float64)
    np.multiply(m, (decay.b1**gap)[:, None], out=m, casting="unsafe")
    np.multiply(v, (decay.b2**gap)[:, None], out=v, casting="unsafe")
    state[:, :w], state[:, w:] = m, v


def _horizon(theta_absmax: np.ndarray, m: np.ndarray, last: np.ndarray, target: int, ss: np.ndarray,
             decay: AdamDecay) -> np.ndarray:
    """Steps (r,) after which the rest of each row's movement is below HORIZON of its largest
    |value| (`theta_absmax` (r,) float32).

    |m| / sqrt(v) <= (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2)) for any gradient history (Cauchy-
    Schwarz on the two moving averages), and catch-up only shrinks it, so with b1^2 < b2 the bound
    needs no pass over the elements; otherwise |m| / eps bounds each move."""
    ss_max = np.maximum.accumulate(ss[::-1])[::-1]  # (target + 1,): max of ss over [j, target]
    scale = ss_max[np.minimum(last + 1, target)]  # (r,)
    limit = HORIZON * np.maximum(theta_absmax, _TINY)  # (r,)
    b1, b2 = decay.b1, decay.b2
    if (ratio := moment_ratio(decay)) is not None:
        steps = _steps_below(scale * ratio, b1 / math.sqrt(b2), limit)
    else:
        steps = _steps_below(scale * np.abs(m).max(axis=1) / decay.eps, b1, limit)
    return np.clip(steps, 1, target - last).astype(np.int64)


def _steps_below(amplitude: np.ndarray, rho: float, limit: np.ndarray) -> np.ndarray:
    """Smallest k with amplitude rho^(k+1) / (1 - rho) <= limit (inf where amplitude is inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.ceil(np.log(limit * (1 - rho) / amplitude) / math.log(rho)) - 1
    return np.nan_to_num(k, nan=np.inf, posinf=np.inf, neginf=0.0)


def _series(m: np.ndarray, inv: np.ndarray, last: np.ndarray, steps: np.ndarray, x_row: np.ndarray,
            ss: np.ndarray, bsq: np.ndarray, decay: AdamDecay) -> np.ndarray:
    """Movement (r, w) float64 of rows whose every element has x <= X_LIMIT (`x_row` (r,): each
    row's bound): -(m / sigma) sum_p (-eps / sigma)^p W_p, by Horner in 1 / sigma.

    Terms: each term is at most x_row times the one before (termwise in k), so the tail after P
    terms is at most (eps / sigma)^P W_P / (1 - x_row); each row takes the fewest terms P that
    bound it by TRUNCATION x its first term (usually 2 or 3; x_row^P is far more pessimistic,
    because the steps with large x carry little weight). P is the row's own, and the terms past
    it are zeros in Horner's scheme (0 + c and 0 * (1 / sigma) are exact), so a row moves the same
    bits whichever rows share its batch: the shards, the hot/cold migration and the in-process
    tables batch rows differently and must still agree."""
    coef = _series_coefs(inv.max(axis=1), last, steps, x_row, ss, bsq, decay)
    acc = np.multiply(inv, coef[-1][:, None])  # (r, w)
    for c in reversed(coef[:-1]):
        acc += c[:, None]
        acc *= inv
    acc *= m
    return acc


def _series_coefs(inv_max: np.ndarray, last: np.ndarray, steps: np.ndarray, x_row: np.ndarray,
                  ss: np.ndarray, bsq: np.ndarray, decay: AdamDecay) -> list[np.ndarray]:
    """The Horner coefficients (r,) each of `_series`, p = 0..P-1: -(-eps)^p W_p where p < the
    row's own P, else 0. inv_max (r,): each row's largest 1 / sigma."""
    window_sum = _window_sums(last, steps, ss, bsq, decay)
    weights = [window_sum(0)]  # W_p (r,) each
    terms = np.zeros(len(inv_max), dtype=np.int64)  # (r,) each row's P, 0 until its tail is small enough
    while True:
        weights.append(window_sum(len(weights)))
        tail = (decay.eps * inv_max) ** (len(weights) - 1) * weights[-1] / weights[0]
        terms[(terms == 0) & (tail <= TRUNCATION * (1 - x_row))] = len(weights) - 1
        if len(weights) > MAX_TERMS or terms.all():
            break
    terms[terms == 0] = len(weights) - 1
    return [np.where(terms > p, -w * (-decay.eps) ** p, 0.0)  # -(-eps)^p W_p, (r,); 0 past the row's P
            for p, w in enumerate(weights[:-1])]


def _mixed(m: np.ndarray, inv: np.ndarray, last: np.ndarray, steps: np.ndarray, ss: np.ndarray,
           bsq: np.ndarray, decay: AdamDecay, stats: CatchUpStats) -> np.ndarray:
    """Movement (r, w) of rows with some element beyond the series' reach: the series where it
    converges, the step-by-step loop elsewhere (sigma near eps or zero; m = 0 does not move)."""
    x = decay.eps * inv / decay.b2 ** (steps[:, None] / 2)  # (r, w)
    series = x <= X_LIMIT
    out = np.zeros(m.shape)
    rr, cc = np.nonzero(series & (m != 0))
    if rr.size:
        flat = _series(m[rr, cc][:, None], inv[rr, cc][:, None], last[rr], steps[rr], x[rr, cc],
                       ss, bsq, decay)
        out[rr, cc] = flat[:, 0]
    rr, cc = np.nonzero(~series & (m != 0))
    if rr.size:
        out[rr, cc] = _loop(m[rr, cc], inv[rr, cc], last[rr], steps[rr], ss, bsq, decay)
    stats.series_elements += int(series.sum())
    stats.loop_elements += int((~series & (m != 0)).sum())
    return out


def _window_sums(last: np.ndarray, steps: np.ndarray, ss: np.ndarray, bsq: np.ndarray,
                 decay: AdamDecay):
    """A function p -> W_p = sum_{k=1..steps} ss[last+k] bsq[last+k]^(p+1) rho_p^k: (r,).

    One cumulative sum per distinct last step: rows last written together share it. The windows
    are gathered once, for all the terms asked for."""
    starts, group = np.unique(last, return_inverse=True)  # (g,), (r,)
    span = int(steps.max())
    k = np.arange(1, span + 1, dtype=np.float64)  # (span,)
    j = np.minimum(starts[:, None] + np.arange(1, span + 1), len(ss) - 1)  # (g, span)
    step_size, root = ss[j], bsq[j]  # (g, span)

    def window_sum(p: int) -> np.ndarray:
        rho = decay.b1 / decay.b2 ** ((p + 1) / 2)
        cum = np.cumsum(step_size * root ** (p + 1) * rho**k, axis=1)  # (g, span)
        return cum[group, steps - 1]

    return window_sum


def _loop(m: np.ndarray, inv: np.ndarray, last: np.ndarray, steps: np.ndarray, ss: np.ndarray,
          bsq: np.ndarray, decay: AdamDecay) -> np.ndarray:
    """The step-by-step sum for elements (e,) the series does not cover: (e,) float64."""
    with np.errstate(divide="ignore"):
        sigma = 1.0 / inv  # (e,)
    out = np.zeros(m.shape)
    for k in range(1, int(steps.max()) + 1):
        on = steps >= k
        j = last[on] + k
        denom = decay.b2 ** (k / 2) * sigma[on] / bsq[j] + decay.eps
        out[on] -= ss[j] * decay.b1**k * m[on] / denom
    return out
