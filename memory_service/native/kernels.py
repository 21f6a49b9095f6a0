"""Launchers of the compiled per-row loops (`_kernels`, kernels.c), and the switch between them
and the numpy reference each caller keeps.

A launcher checks dtypes, shapes and contiguity, then calls the C loop (which releases the GIL).
Callers ask `active()` first and keep their numpy code as the reference: it runs where the
extension is not built, inside `numpy_reference()` (the tests compare both bit for bit), and for
arrays a kernel does not take (`takes`: in-place operands must be C-contiguous of the expected
dtype, or the update would land in a copy).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from memory_service.native.compiled import AVAILABLE, _kernels

_enabled = AVAILABLE  # the switch: compiled loops when built, numpy otherwise


def active() -> bool:
    """Whether callers run the compiled loops (built, and not switched off)."""
    return _enabled


@contextmanager
def numpy_reference() -> Iterator[None]:
    """Runs the block on the numpy reference paths (the tests' baseline)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def takes(*arrays: np.ndarray, dtype=np.float32) -> bool:
    """Whether the kernels can work on `arrays` in place: C-contiguous, of `dtype`."""
    return all(isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous for a in arrays)


def _ids(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    assert a.dtype.kind in "iu" or a.size == 0, f"indices of dtype {a.dtype}"  # never a mask
    return np.ascontiguousarray(a, dtype=np.int64)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# --- ids and records ---

def index_lookup(keys: np.ndarray, slots: np.ndarray, ids: np.ndarray, bits: int, want_slots: bool) -> np.ndarray:
    """SlotIndex probe: ids (n,) -> (n,) int64 slots (want_slots) or buckets, -1 where absent.
    keys, slots: (2^bits,) int64 contiguous."""
    assert keys.shape == slots.shape == (1 << bits,) and takes(keys, slots, dtype=np.int64)
    ids = _ids(ids)
    out = np.empty(len(ids), dtype=np.int64)
    _kernels.index_lookup(keys, slots, ids, out, len(ids), bits, int(want_slots))
    return out


def gather(src: np.ndarray, at: np.ndarray, out: np.ndarray | None = None,
           out_at: np.ndarray | None = None) -> np.ndarray:
    """src[at] for a C-contiguous src (cap, ...) and at (m,) in [0, cap): a new (m, ...) array,
    or written into `out` (k, ...) at rows `out_at` (m,) (out[out_at] = src[at], no temporary)."""
    assert src.flags.c_contiguous
    at = _ids(at)
    if out is None:
        out = np.empty((len(at),) + src.shape[1:], dtype=src.dtype)
    assert out.dtype == src.dtype and out.shape[1:] == src.shape[1:] and out.flags.c_contiguous
    row_bytes = src.itemsize * int(np.prod(src.shape[1:], dtype=np.int64))
    _kernels.gather(src, src.shape[0], row_bytes, at, len(at), out, out.shape[0],
                    None if out_at is None else _ids(out_at))
    return out


def scatter(dst: np.ndarray, at: np.ndarray, src: np.ndarray, src_at: np.ndarray | None = None) -> None:
    """dst[at] = src (m, ...), or src[src_at] with src_at (m,), for a C-contiguous dst (cap, ...)
    and distinct at (m,)."""
    assert dst.flags.c_contiguous
    at = _ids(at)
    src = np.ascontiguousarray(src, dtype=dst.dtype)
    src = src.reshape((len(at) if src_at is None else src.shape[0],) + dst.shape[1:])
    row_bytes = dst.itemsize * int(np.prod(dst.shape[1:], dtype=np.int64))
    _kernels.scatter(dst, dst.shape[0], row_bytes, at, len(at), src, src.shape[0],
                     None if src_at is None else _ids(src_at))


def sum_runs(grads: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """np.add.reduceat(grads, starts, axis=0) for float32 grads (n, w) and increasing starts (m,)
    from 0: each run added in order, in float32."""
    grads, starts = _f32(grads), _ids(starts)
    n, w = grads.shape
    assert len(starts) and starts[0] == 0 and (np.diff(starts) > 0).all() and starts[-1] < n
    out = np.empty((len(starts), w), dtype=np.float32)
    _kernels.sum_runs(grads, n, w, starts, len(starts), out)
    return out


def all_finite(values: np.ndarray) -> bool:
    """np.isfinite(values).all() for float32 values, in one pass without a mask."""
    values = _f32(values)
    return _kernels.all_finite(values, values.size)


# --- optimizer steps: rows (n, w), state (n, s), in place; grads (n, w) ---

def sgd(rows: np.ndarray, grads: np.ndarray, alpha: float) -> None:
    n, w = rows.shape
    _kernels.sgd(rows, rows, _f32(grads), n, w, float(np.float32(alpha)))


def adagrad(rows: np.ndarray, state: np.ndarray, grads: np.ndarray, alpha: float, eps: float) -> None:
    n, w = rows.shape
    assert state.shape == (n, w)
    _kernels.adagrad(rows, state, _f32(grads), n, w, float(np.float32(alpha)), float(np.float32(eps)))


def sparse_adam(rows: np.ndarray, state: np.ndarray, grads: np.ndarray, c1: float, c2: float, eps: float,
                neg_step: float) -> None:
    """float32 arguments: c1 = 1 - beta1, c2 = 1 - beta2, eps, neg_step = -step_size."""
    n, w = rows.shape
    assert state.shape == (n, 2 * w)
    _kernels.sparse_adam(rows, state, _f32(grads), n, w, c1, c2, eps, neg_step)


def adam(rows: np.ndarray, state: np.ndarray, grads: np.ndarray, weight: float, rest: float, b2: float,
         c2: float, bsq: float, eps: float, neg_step: float) -> None:
    """optimizer.Adam.apply's step; weight, rest in float64, the others float32 (kernels.c)."""
    n, w = rows.shape
    assert state.shape == (n, 2 * w)
    _kernels.adam(rows, state, _f32(grads), n, w, weight, rest, weight < 0.5, b2, c2, bsq, eps, neg_step)


def adam_row_stats(rows: np.ndarray, state: np.ndarray, at: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row at[i] (n,) (None: every row) of rows (count, w), state (count, 2w): (max |theta|
    (n,) float32, max 1 / sqrt(v) (n,) float64, any m != 0 (n,) bool)."""
    count, w = rows.shape
    assert state.shape == (count, 2 * w) and takes(rows, state)
    at = None if at is None else _ids(at)
    n = count if at is None else len(at)
    absmax, inv_max, m_any = np.empty(n, np.float32), np.empty(n, np.float64), np.empty(n, bool)
    _kernels.adam_row_stats(rows, state, count, w, at, n, absmax, inv_max, m_any)
    return absmax, inv_max, m_any


def adam_catch_up_series(rows: np.ndarray, state: np.ndarray, at: np.ndarray | None, coef: np.ndarray,
                         mfac: np.ndarray, vfac: np.ndarray) -> None:
    """catch_up's series movement and moment decay, in place, of the distinct rows at (n,) (None:
    every row) of rows (count, w), state (count, 2w); coef (n, p) float64 Horner coefficients,
    mfac, vfac (n,) float64 decay factors."""
    count, w = rows.shape
    assert state.shape == (count, 2 * w) and takes(rows, state)
    at = None if at is None else _ids(at)
    n = count if at is None else len(at)
    coef = np.ascontiguousarray(coef, dtype=np.float64)
    assert coef.shape[0] == n
    _kernels.adam_catch_up_series(rows, state, count, w, at, n, coef, coef.shape[1],
                                  np.ascontiguousarray(mfac, np.float64), np.ascontiguousarray(vfac, np.float64))
