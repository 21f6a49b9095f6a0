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
