"""Router: which shard is each row's home, and the requests that carry a call's rows there.

The client's pure half (numpy only: no gRPC, no Ray, no table configs), so the routing can be
tested against a brute-force statement of the rules. A call's ids are deduplicated and grouped by
home shard (`route`), each shard's part is cut into requests small enough for the wire
(`requests`), and the rows that come back for the distinct ids are put back into the caller's
order and shape (`Route.reassemble`).

Homes: cold shard id % N (the rule of memory_service/sharding.py), except while a row is hot: then
hot shard id % H, numbered N + id % H here (shard indices: cold 0..N-1, then hot N..N+H-1). Which
rows are hot the client learns from the hot shards' maps and hands to `set_hot`.

The per-row loops (dedup with its inverse, the gather back into the caller's order) run in C
where memory_service.native is built (`unique_inverse`, `gather`), each beside the numpy
statement it must equal bit for bit (`unique_inverse_reference`, `gather_reference`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.ids import contains, sorted_unique
from memory_service.native import compiled
from memory_service.sharding import shard_of

ID_BYTES = 8  # each row travels with its int64 id
Chunk = list[tuple[str, int, int]]  # [(table, start, stop)]: slices of the tables' routes' `grouped`
Request = tuple[int, Chunk]  # (shard, its chunk)


def as_row_ids(ids) -> np.ndarray:
    """`ids` (any shape, any integer dtype) as int64; InvalidArgument for other dtypes."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise InvalidArgument(f"row ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def unique_inverse_reference(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keys (n,) int64 -> (distinct keys ascending (u,), each key's position among them (n,))."""
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, inverse.reshape(-1).astype(np.int64, copy=False)


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`unique_inverse_reference` for keys (n,) int64 >= 0: a radix sort in C where it is built
    (np.unique's comparison sort of 16k ids took ~1.3 ms, a fifth of a same-host fetch)."""
    if not compiled.AVAILABLE:
        return unique_inverse_reference(keys)
    keys = np.ascontiguousarray(keys, np.int64)  # (n,)
    unique, inverse = np.empty_like(keys), np.empty_like(keys)
    num = compiled._routing.unique_inverse(keys, unique, inverse)
    return unique[:num], inverse


def gather_reference(rows: np.ndarray, index: np.ndarray, widen_bf16: bool = False) -> np.ndarray:
    """rows (u, width) float32, or uint16 bf16 bit patterns -> rows[index] (n, width); bf16 widened
    to float32 when `widen_bf16` (exact: bf16 is float32's upper half)."""
    out = rows.take(index, axis=0)  # (n, width)
    return (out.astype(np.uint32) << 16).view(np.float32) if widen_bf16 else out


def gather(rows: np.ndarray, index: np.ndarray, widen_bf16: bool = False) -> np.ndarray:
    """`gather_reference` in one pass in C where it is built, with the GIL released (the other
    replies' threads go on meanwhile); a bf16 gather then moves half the bytes and widens on the way."""
    if not compiled.AVAILABLE or rows.ndim != 2 or not rows.flags.c_contiguous:
        return gather_reference(rows, index, widen_bf16)
    index = np.ascontiguousarray(index, np.int64)  # (n,)
    if widen_bf16:
        out = np.empty((len(index), rows.shape[1]), np.float32)
        compiled._routing.gather_bf16(rows.view(np.uint16), rows.shape[1], index, out)
    else:
        out = np.empty((len(index), rows.shape[1]), rows.dtype)
        compiled._routing.gather_rows(rows.reshape(-1).view(np.uint8), rows.shape[1] * rows.itemsize, index, out)
    return out


@dataclass(frozen=True)
class Route:
    """One table's ids, deduplicated and grouped by home shard: `grouped` holds the distinct ids
    with shard 0's first, then shard 1's, ... (each shard's in increasing order);
    `bounds[s]:bounds[s+1]` is shard s's slice of it."""
    grouped: np.ndarray  # (u,) int64 distinct ids, grouped by shard
    index: np.ndarray  # (n,) caller position -> position in `grouped`
    shape: tuple[int, ...]  # the caller's ids shape
    bounds: np.ndarray  # (num_shards + 1,) slice bounds per shard

    def ids_of(self, shard: int) -> np.ndarray:
        """(bounds[shard+1] - bounds[shard],) the distinct ids whose home is `shard`."""
        return self.grouped[self.bounds[shard]:self.bounds[shard + 1]]

    def reassemble(self, rows: np.ndarray, widen_bf16: bool = False) -> np.ndarray:
        """Rows of the distinct ids (u, width) -> the caller's (*shape, width), in its order;
        uint16 bf16 bit patterns widened to float32 on the way when `widen_bf16`."""
        return gather(rows, self.index, widen_bf16).reshape(*self.shape, -1)


class Router:
    """Routes the ids of `num_cold` cold and `num_hot` hot shards into requests of at most
    `max_rows_per_request` rows and `max_request_bytes` of rows and ids. Holds the hot maps
    (table -> sorted hot ids) as the client last heard them."""

    def __init__(self, num_cold: int, num_hot: int = 0, max_rows_per_request: int = 65536,
                 max_request_bytes: int = 1 << 28):
        if num_cold < 1 or num_hot < 0:
            raise ValueError(f"num_cold {num_cold} must be >= 1 and num_hot {num_hot} >= 0")
        if max_rows_per_request < 1 or max_request_bytes < 1:
            raise ValueError(f"max_rows_per_request {max_rows_per_request} and max_request_bytes "
                             f"{max_request_bytes} must be >= 1")
        self.num_cold, self.num_hot = num_cold, num_hot
        self.max_rows_per_request = max_rows_per_request
        self.max_request_bytes = max_request_bytes
        self._hot: dict[str, np.ndarray] = {}  # table -> sorted ids that are hot (any hot shard)

    @property
    def num_shards(self) -> int:
        return self.num_cold + self.num_hot

    # -- hot maps -------------------------------------------------------------------------------
    def knows_hot(self, name: str) -> bool:
        """Whether table `name`'s hot map was set (the client loads it on first use)."""
        return name in self._hot

    def set_hot(self, name: str, ids: np.ndarray) -> None:
        """Table `name`'s hot rows are `ids` (m,) now (any order, duplicates allowed)."""
        self._hot[name] = sorted_unique(as_row_ids(ids).reshape(-1))

    def hot_ids(self, name: str) -> np.ndarray:
        """Sorted ids of table `name` that are hot, as last set (none if never set)."""
        return self._hot.get(name, np.empty(0, np.int64))

    def home_of(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The home shard index of each of `ids` (n,) of table `name` -> (n,) int64."""
        ids = as_row_ids(ids)
        cold = shard_of(ids, self.num_cold)
        if not self.num_hot:
            return cold
        return np.where(contains(self.hot_ids(name), ids), self.num_cold + ids % self.num_hot, cold)

    # -- routing --------------------------------------------------------------------------------
    def route(self, name: str, ids, num_rows: int) -> Route:
        """Table `name`'s ids (any shape) deduplicated and grouped by home shard, after checking
        them against [0, num_rows) here: a push spans shards, and one shard rejecting its part
        after another applied its own would leave the table half-updated."""
        arr = as_row_ids(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= num_rows):  # two reductions, no mask
            bad = arr[(arr < 0) | (arr >= num_rows)]
            raise InvalidArgument(f"table {name!r}: row id {int(bad[0])} out of range [0, {num_rows})")
        flat = arr.reshape(-1)  # (n,)
        if len(self.hot_ids(name)):
            return self._route_hot(name, flat, arr.shape)
        return self._route_cold(flat, arr.shape, num_rows)

    def _route_cold(self, flat: np.ndarray, shape: tuple[int, ...], num_rows: int) -> Route:
        """`route` when no row is hot. One sort groups by shard and dedups: key = shard * per_shard
        + id // N is a bijection on [0, num_rows) that orders ids by (shard, id) and stays below
        num_rows + N."""
        n = self.num_cold
        per_shard = -(-num_rows // n)
        keys, index = unique_inverse((flat % n) * per_shard + flat // n)  # (u,), (n,)
        grouped = (keys % per_shard) * n + keys // per_shard  # (u,)
        bounds = np.searchsorted(keys, np.arange(n + 1) * per_shard)  # (N + 1,)
        bounds = np.concatenate([bounds, np.full(self.num_hot, bounds[-1])])  # no ids for hot shards
        return Route(grouped, index.reshape(-1), shape, bounds)

    def _route_hot(self, name: str, flat: np.ndarray, shape: tuple[int, ...]) -> Route:
        """`route` when some rows are hot: hot ids go to hot shard id % H (index N + id % H)."""
        distinct, index = unique_inverse(flat)  # (u,), (n,)
        home = self.home_of(name, distinct)  # (u,)
        order = np.argsort(home, kind="stable")  # (u,) by shard, then id
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        bounds = np.searchsorted(home[order], np.arange(self.num_shards + 1))  # (num_shards + 1,)
        return Route(distinct[order], rank[index.reshape(-1)], shape, bounds)

    def requests(self, routes: dict[str, Route], row_bytes: dict[str, int]) -> list[Request]:
        """Per shard, in shard order, requests [(table, start, stop)] of at most
        max_rows_per_request rows and max_request_bytes of payload (`row_bytes[table]` a row,
        plus its id). Every request holds at least one row; a shard with none gets none."""
        out = []
        for shard in range(self.num_shards):
            chunk, rows, size = [], 0, 0
            for name, route in routes.items():
                nbytes = row_bytes[name] + ID_BYTES
                step = max(1, min(self.max_rows_per_request, self.max_request_bytes // nbytes))
                for start in range(int(route.bounds[shard]), int(route.bounds[shard + 1]), step):
                    stop = min(start + step, int(route.bounds[shard + 1]))
                    if chunk and (rows + stop - start > self.max_rows_per_request
                                  or size + (stop - start) * nbytes > self.max_request_bytes):
                        out.append((shard, chunk))
                        chunk, rows, size = [], 0, 0
                    chunk.append((name, start, stop))
                    rows, size = rows + stop - start, size + (stop - start) * nbytes
            if chunk:
                out.append((shard, chunk))
        return out
