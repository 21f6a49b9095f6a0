"""Placement: which rows of a table a faster tier keeps, decided from the reads it sees.

N-gram reads are Zipf-distributed, so a small share of rows takes most lookups. A `Policy` watches
the reads of one table (`record`), is told which rows a look-ahead request says will be read soon
(`expect`), and on a background thread, between requests, plans moves in batches (`plan`): rows
to admit into the tier and rows to evict from it, keeping at most `capacity` rows there. Requests
never wait for a decision; a tier serves what it holds and the rest comes from the tier below.

The same interface places rows between a cold shard's DRAM and its LMDB files and between cold
shards and the GPU-resident hot shards.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Policy(ABC):
    """Placement of one table's rows in one tier of `capacity` rows."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity {capacity} must be >= 0")
        self.capacity = capacity

    @abstractmethod
    def record(self, ids: np.ndarray) -> None:
        """The distinct row ids (n,) int64 one request read (hits and misses alike)."""

    def expect(self, ids: np.ndarray) -> None:
        """Distinct row ids (n,) a look-ahead request will read soon (default: ignored)."""

    @abstractmethod
    def plan(self, resident: np.ndarray, max_moves: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(admit, evict): distinct ids not in `resident` (sorted distinct ids now in the tier) to
        bring in, and ids of `resident` to move out, so that len(resident) - len(evict) +
        len(admit) <= capacity; at most `max_moves` admissions when given."""


class LRUPolicy(Policy):
    """Keeps the `capacity` most recently read rows (plain LRU, a baseline; look-ahead ignored).

    The recency list is an array of distinct ids, oldest first, trimmed to `capacity`: the rows
    LRU keeps are exactly its contents, so nothing older needs remembering."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._recent = np.empty(0, dtype=np.int64)  # (<= capacity,) distinct ids, oldest first

    def record(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        kept = self._recent[~np.isin(self._recent, ids)]
        recent = np.concatenate([kept, ids])
        self._recent = recent[max(len(recent) - self.capacity, 0):].copy()  # a copy: no view pins `recent`

    def plan(self, resident: np.ndarray, max_moves: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        recent = self._recent[max(len(self._recent) - self.capacity, 0):] if self.capacity else self._recent[:0]
        wanted = recent[::-1]  # most recent first
        admit = wanted[~np.isin(wanted, resident)]
        if max_moves is not None:
            admit = admit[:max_moves]
        stale = resident[~np.isin(resident, recent)]  # resident, but not among the recent
        excess = len(resident) + len(admit) - self.capacity
        return admit, stale[: max(excess, 0)]
class LFUPolicy(Policy):
    """Plain LFU: exact read counts; keeps the `capacity` most-read rows seen."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._counts: dict[int, int] = {}

    def record(self, ids: np.ndarray) -> None:
        for i in np.asarray(ids, np.int64).tolist():
            self._counts[i] = self._counts.get(i, 0) + 1

    def plan(self, resident: np.ndarray, max_moves: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if not self._counts:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        ids = np.fromiter(self._counts.keys(), np.int64, len(self._counts))
        counts = np.fromiter(self._counts.values(), np.int64, len(self._counts))
        best = ids[np.argsort(-counts, kind="stable")[:self.capacity]]
        admit = np.setdiff1d(best, resident)
        if max_moves is not None:
            admit = admit[:max_moves]
        keep = np.union1d(np.intersect1d(resident, best), admit)
        evict = np.setdiff1d(resident, keep)
        overflow = len(keep) - self.capacity
        if overflow > 0:
            admit = admit[:len(admit) - overflow]
        return admit, evict


def make_policy(name: str, capacity: int) -> Policy:
    """A policy by name: "lfu", "lru" (and, until the tuned policies land, "engram" = lfu)."""
    if name in ("lfu", "engram"):
        return LFUPolicy(capacity)
    if name == "lru":
        return LRUPolicy(capacity)
    raise ValueError(f"unknown placement policy {name!r}")
