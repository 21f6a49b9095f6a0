"""Which shard holds a row: the one stable rule shared by the client, the shards and the tests.

Row r of every table lives on shard r % num_shards. Row ids are already hash outputs (the
trainer's N-gram hashes reduced modulo the table size), so modulo spreads them evenly without
another hash, and the rule needs no table of its own: any process that knows `num_shards` routes
an id the same way. A row's value never depends on its shard (rows.init_rows is a function of
(seed, row id) only), so the same table read through 1 or 3 shards gives the same rows.
"""
from __future__ import annotations

import numpy as np


def _check_num_shards(num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards {num_shards} must be >= 1")


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard of each row id. ids: (n,) non-negative integer -> (n,) int64 in [0, num_shards)."""
    _check_num_shards(num_shards)
    return np.asarray(ids, dtype=np.int64) % num_shards


def split_by_shard(ids: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Positions into `ids` of the ids each shard holds, in shard order.

    ids: (n,) -> num_shards arrays of int64 positions; together they are a permutation of
    arange(n), each in increasing order, so `ids[positions[s]]` is shard s's request in the
    caller's order and rows come back with `out[positions[s]] = rows_of_shard_s`.
    """
    shards = shard_of(ids, num_shards)  # (n,)
    order = np.argsort(shards, kind="stable")  # (n,) positions grouped by shard, order kept
    counts = np.bincount(shards, minlength=num_shards)  # (num_shards,)
    return np.split(order, np.cumsum(counts)[:-1])
