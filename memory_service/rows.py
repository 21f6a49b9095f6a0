"""Initial row values: one pure function of (table seed, row id).

Every place that materialises an Engram row for the first time (the in-process table of the
trainer, a shard of the table service whatever the number of shards, a checkpoint restore) calls
`init_rows`, so a row starts identical everywhere and an untouched row never needs storing.

The generator is Philox4x64-10 (Salmon et al., 2011), counter-based: the random block for
(table seed, row id, block j) is a pure function of those numbers, with no state to carry between
rows. This module vectorises the exact Philox4x64-10 of `numpy.random.Philox` over many rows at
once (numpy's own generator would need one Python object per row: ~100x slower); the tests check
bit-equality with `numpy.random.Philox`.

Layout: key = (seed, 0); block j of row r uses counter (j + 1, r, 0, 0), i.e. what
`numpy.random.Philox(key=(seed, 0), counter=(j, r, 0, 0)).random_raw(4)` returns (numpy increments
the counter before use). Each block gives 4 uint64 -> 4 uniforms in (0, 1) -> 4 normals by
Box-Muller; a row of width w uses ceil(w / 4) blocks and keeps the first w normals.
"""
from __future__ import annotations

import collections

import numpy as np

from memory_service.native import compiled

_M = np.array([[0xD2E7470EE14C6C93], [0xCA5A826395121157]], dtype=np.uint64)  # (2, 1): the two multipliers
_W = np.array([[0x9E3779B97F4A7C15], [0xBB67AE8584CAA73B]], dtype=np.uint64)  # (2, 1): the key's Weyl steps
_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_M_LO, _M_HI = _M & _LO32, _M >> _S32
_ROUNDS = 10


def _mulhi(b: np.ndarray) -> np.ndarray:
    """High 64 bits of the 128-bit products _M * b, b: (2, n) uint64, from 32x32 products that
    cannot overflow uint64 (t and u stay below 2^64 - 2^32)."""
    b_lo, b_hi = b & _LO32, b >> _S32
    t = _M_LO * b_hi + ((_M_LO * b_lo) >> _S32)
    u = _M_HI * b_lo + (t & _LO32)
    return _M_HI * b_hi + (t >> _S32) + (u >> _S32)


def philox4x64(counter: np.ndarray, key: tuple[int, int] | np.ndarray) -> np.ndarray:
    """Philox4x64-10 of each counter. counter: (n, 4) uint64 -> (n, 4) uint64; key: one (k0, k1)
    for every counter, or (2, n) uint64, a key per counter (several tables in one pass). Compiled
    (memory_service/native/philox.c) where built, `philox4x64_numpy` otherwise: bit for bit the same."""
    if compiled.AVAILABLE:
        k = np.ascontiguousarray(np.asarray(key, dtype=np.uint64).reshape(2, -1))
        out = np.empty((counter.shape[0], 4), dtype=np.uint64)
        compiled._philox.philox(np.ascontiguousarray(counter, dtype=np.uint64), k[0], k[1], out)
        return out
    return philox4x64_numpy(counter, key)


def philox4x64_numpy(counter: np.ndarray, key: tuple[int, int] | np.ndarray) -> np.ndarray:
    """Philox4x64-10 of each counter in numpy (the reference of the compiled one).

    The two multiplications of a round run as one (2, n) product (the round's cost is numpy's
    per-call overhead at the batch sizes a shard sees): `x` holds words (0, 2), `y` words (1, 3)."""
    x, y = counter[:, 0::2].T.copy(), counter[:, 1::2].T.copy()  # (2, n) each
    k = np.asarray(key, dtype=np.uint64).reshape(2, -1)  # (2, 1) or (2, n)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        for r in range(_ROUNDS):
            if r:
                k = k + _W
            hi, lo = _mulhi(x), _M * x
            x, y = hi[::-1] ^ y ^ k, lo[::-1]  # (hi1 ^ c1 ^ k0, hi0 ^ c3 ^ k1), (lo1, lo0)
    out = np.empty((counter.shape[0], 4), dtype=np.uint64)
    out[:, 0::2], out[:, 1::2] = x.T, y.T
    return out


def _check(seed: int, row_ids: np.ndarray, width: int) -> None:
    if not 0 <= seed < 2**64:
        raise ValueError(f"table seed {seed} must be in [0, 2**64)")
    if width < 1:
        raise ValueError(f"row width {width} must be >= 1")
    if row_ids.size and row_ids.min() < 0:
        raise ValueError(f"row id {int(row_ids.min())} is negative")


def init_rows(seed: int, row_ids: np.ndarray, width: int, scale: float = 1.0) -> np.ndarray:
    """Initial values of rows `row_ids` of the table with `seed`: N(0, scale^2), float32.

    row_ids: (n,) integer -> (n, width) float32. Row r's value depends only on (seed, r, width,
    scale), never on which other rows are asked for or on how the table is sharded.
    """
    row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)  # (n,)
    _check(seed, row_ids, width)
    return _normals(seed, row_ids, width, scale)


def init_rows_many(tables: list[tuple[int, np.ndarray, int, float]]) -> list[np.ndarray]:
    """`init_rows(seed, row_ids, width, scale)` of each of `tables`, bit for bit, in one Philox
    pass per width: for small requests a pass costs numpy's per-call overhead whatever its
    length (0.16 ms for 1 row, 0.26 for 16), so a fetch of many tables computes its never-written
    rows at the price of one."""
    out: list[np.ndarray | None] = [None] * len(tables)
    for width in sorted({t[2] for t in tables}):
        part = [i for i, t in enumerate(tables) if t[2] == width]
        ids = [np.asarray(tables[i][1], dtype=np.int64).reshape(-1) for i in part]
        for i, table_ids in zip(part, ids):
            _check(tables[i][0], table_ids, width)
        lengths = [len(table_ids) for table_ids in ids]
        seeds = np.repeat(np.array([tables[i][0] for i in part], dtype=np.uint64), lengths)
        scales = np.repeat(np.array([tables[i][3] for i in part], dtype=np.float64), lengths)[:, None]
        rows = _normals(seeds, np.concatenate(ids), width, scales)
        for i, chunk in zip(part, np.split(rows, np.cumsum(lengths)[:-1])):
            out[i] = chunk
    return out


# Values computed per pass of _normals_of: a pass's temporaries (Philox words, float64 uniforms and
# normals) take ~40 bytes a value, so a pass of 2^18 values stays near 10 MiB, in cache-sized
# arrays. One pass over a whole 64M-value request peaked at 3.7 GiB and ran 2.5x slower
# (issue 22, finding 7).
_PASS_VALUES = 1 << 18


def _normals(seed: int | np.ndarray, row_ids: np.ndarray, width: int, scale) -> np.ndarray:
    """Rows (n, width) float32 of row_ids (n,) of the table with `seed` (or seeds (n,) uint64,
    one per row), times `scale` (a float, or (n, 1) float64), computed _PASS_VALUES at a time
    (whole rows: at least one a pass)."""
    per_pass = max(1, _PASS_VALUES // width)
    n = row_ids.shape[0]
    if n <= per_pass:
        return _normals_of(seed, row_ids, width, scale)
    out = np.empty((n, width), dtype=np.float32)
    for start in range(0, n, per_pass):
        part = slice(start, start + per_pass)
        out[part] = _normals_of(seed[part] if isinstance(seed, np.ndarray) else seed, row_ids[part], width,
                                scale[part] if isinstance(scale, np.ndarray) else scale)
    return out


def _normals_of(seed: int | np.ndarray, row_ids: np.ndarray, width: int, scale) -> np.ndarray:
    """_normals in one pass."""
    num_blocks = -(-width // 4)
    n = row_ids.shape[0]
    counter = np.zeros((n, num_blocks, 4), dtype=np.uint64)  # (n, blocks, 4)
    counter[:, :, 0] = np.arange(1, num_blocks + 1, dtype=np.uint64)
    counter[:, :, 1] = row_ids.astype(np.uint64)[:, None]
    if isinstance(seed, np.ndarray):  # a key per counter: (2, n * blocks)
        key = np.stack([np.repeat(seed, num_blocks), np.zeros(n * num_blocks, dtype=np.uint64)])
    else:
        key = (seed, 0)
    bits = philox4x64(counter.reshape(-1, 4), key).reshape(n, num_blocks * 4)
    # 53-bit uniforms strictly inside (0, 1) so log() is finite.
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54  # (n, 4*blocks)
    u1, u2 = u[:, 0::2], u[:, 1::2]  # (n, 2*blocks) each
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    normals = np.empty_like(u)
    normals[:, 0::2] = radius * np.cos(angle)
    normals[:, 1::2] = radius * np.sin(angle)
    return (normals[:, :width] * scale).astype(np.float32)


class InitialRows:
    """`init_rows` of one table that remembers the rows of its last `keep` calls made with
    `remember`: in training a row is read before it was ever written (computed there) and takes
    its first gradient in the same step (computed again); the second time is a lookup. Exact,
    since `init_rows` is pure; at most `max_bytes` of rows are remembered."""

    def __init__(self, seed: int, width: int, scale: float, keep: int = 2, max_bytes: int = 1 << 20) -> None:
        self.seed, self.width, self.scale = seed, width, scale
        self.max_rows = max(1, max_bytes // (4 * width))
        self._kept: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque(maxlen=keep)
        self.computed = 0  # rows computed (the rest of those asked for came from memory)

    def __call__(self, ids: np.ndarray, remember: bool = False) -> np.ndarray:
        """Initial rows of `ids` (n,) -> (n, width) float32, as `init_rows` gives them."""
        return initial_rows_many([(self, ids)], remember)[0]

    def _recall(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows (n, width) with those remembered filled in, mask (n,) of the ids still to compute)."""
        rows = np.empty((len(ids), self.width), dtype=np.float32)
        todo = np.ones(len(ids), dtype=bool)
        for known, known_rows in self._kept:  # known: sorted distinct ids
            at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
            hit = todo & (known[at] == ids)
            rows[hit] = known_rows[at[hit]]
            todo &= ~hit
        return rows, todo

    def _remember(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if 0 < len(ids) <= self.max_rows // self._kept.maxlen:
            distinct, first = np.unique(ids, return_index=True)
            self._kept.append((distinct, rows[first]))


def initial_rows_many(requests: list[tuple[InitialRows, np.ndarray]], remember: bool = False) -> list[np.ndarray]:
    """`initial(ids, remember)` of each (initial, ids) of `requests` (one per table), the rows
    none of them remembers computed together (`init_rows_many`)."""
    requests = [(initial, np.asarray(ids, dtype=np.int64).reshape(-1)) for initial, ids in requests]
    recalled = [initial._recall(ids) for initial, ids in requests]
    todo = [(i, ids[mask]) for i, ((_, ids), (_, mask)) in enumerate(zip(requests, recalled)) if mask.any()]
    computed = init_rows_many([(requests[i][0].seed, ids, requests[i][0].width, requests[i][0].scale)
                               for i, ids in todo])
    for (i, ids), rows in zip(todo, computed):
        if len(ids) == len(requests[i][1]):  # none remembered: the computed rows as they are
            recalled[i] = (rows, recalled[i][1])
        else:
            recalled[i][0][recalled[i][1]] = rows
        requests[i][0].computed += len(ids)
    if remember:
        for (initial, ids), (rows, _) in zip(requests, recalled):
            initial._remember(ids, rows)
    return [rows for rows, _ in recalled]


def table_seed(base_seed: int, *parts: int) -> int:
    """A table's seed derived from a base seed and small non-negative integers (layer, order, head).

    Mixed through one Philox block so nearby inputs give unrelated seeds; the result fits uint64.
    """
    if len(parts) > 3 or any(p < 0 for p in parts):
        raise ValueError(f"seed parts {parts} must be at most 3 non-negative integers")
    counter = np.zeros((1, 4), dtype=np.uint64)
    counter[0, 1 : 1 + len(parts)] = np.asarray(parts, dtype=np.uint64)
    return int(philox4x64(counter, (base_seed % 2**64, 0x454E4752))[0, 0])
