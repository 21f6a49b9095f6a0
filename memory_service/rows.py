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

import numpy as np

_M0 = np.uint64(0xD2E7470EE14C6C93)
_M1 = np.uint64(0xCA5A826395121157)
_W0 = np.uint64(0x9E3779B97F4A7C15)
_W1 = np.uint64(0xBB67AE8584CAA73B)
_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_ROUNDS = 10


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full 64x64 -> 128-bit product as (hi, lo), from four 32x32 products that fit in uint64."""
    a_lo, a_hi = a & _LO32, a >> _S32
    b_lo, b_hi = b & _LO32, b >> _S32
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> _S32) + (lh & _LO32) + (hl & _LO32)
    hi = hh + (lh >> _S32) + (hl >> _S32) + (mid >> _S32)
    return hi, a * b


def philox4x64(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x64-10 of each counter. counter: (n, 4) uint64 -> (n, 4) uint64."""
    c0, c1, c2, c3 = (counter[:, i].copy() for i in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        for r in range(_ROUNDS):
            if r:
                k0, k1 = k0 + _W0, k1 + _W1
            hi0, lo0 = _mulhilo(_M0, c0)
            hi1, lo1 = _mulhilo(_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=1)


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
    num_blocks = -(-width // 4)
    n = row_ids.shape[0]
    counter = np.zeros((n, num_blocks, 4), dtype=np.uint64)  # (n, blocks, 4)
    counter[:, :, 0] = np.arange(1, num_blocks + 1, dtype=np.uint64)
    counter[:, :, 1] = row_ids.astype(np.uint64)[:, None]
    bits = philox4x64(counter.reshape(-1, 4), (seed, 0)).reshape(n, num_blocks * 4)
    # 53-bit uniforms strictly inside (0, 1) so log() is finite.
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54  # (n, 4*blocks)
    u1, u2 = u[:, 0::2], u[:, 1::2]  # (n, 2*blocks) each
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    normals = np.empty_like(u)
    normals[:, 0::2] = radius * np.cos(angle)
    normals[:, 1::2] = radius * np.sin(angle)
    return (normals[:, :width] * scale).astype(np.float32)


def table_seed(base_seed: int, *parts: int) -> int:
    """A table's seed derived from a base seed and small non-negative integers (layer, order, head).

    Mixed through one Philox block so nearby inputs give unrelated seeds; the result fits uint64.
    """
    if len(parts) > 3 or any(p < 0 for p in parts):
        raise ValueError(f"seed parts {parts} must be at most 3 non-negative integers")
    counter = np.zeros((1, 4), dtype=np.uint64)
    counter[0, 1 : 1 + len(parts)] = np.asarray(parts, dtype=np.uint64)
    return int(philox4x64(counter, (base_seed % 2**64, 0x454E4752))[0, 0])
