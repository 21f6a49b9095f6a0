"""The plain policies: LRU, exact LFU and random eviction, over a dense per-row value (`Counts`).

Each keeps state per row id up to the largest id seen, fine for a replay or a table of a few
million rows; memory_service/placement/recent.py holds the LRU whose memory a tier's capacity bounds.
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import check_ids
from memory_service.placement.policy import Policy, Reads, plan_by_keys


class Counts:
    """A dense int64 value per row id, grown on demand to the largest id seen (8 bytes a row): a
    policy places one table's rows, whose ids run below the table's size."""

    def __init__(self) -> None:
        self.values = np.zeros(0, np.int64)

    def grow(self, ids: np.ndarray) -> None:
        if ids.size and ids.max() >= len(self.values):
            size = max(int(ids.max()) + 1, len(self.values) * 3 // 2)
            self.values = np.concatenate([self.values, np.zeros(size - len(self.values), np.int64)])

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Values (n,) of ids (n,); 0 for ids never set."""
        known = ids < len(self.values)
        out = np.zeros(len(ids), np.int64)
        out[known] = self.values[ids[known]]
        return out


class LRUPolicy(Policy):
    """Plain LRU: every row read since the last plan comes in; the least recently read go out.
    State: the request number of each row's last read, 8 bytes per row id up to the largest."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._last = Counts()
        self._reads = Reads()
        self._clock = 0

    def record(self, ids: np.ndarray) -> None:
        ids = check_ids("ids", ids)
        self._clock += 1
        self._last.grow(ids)
        self._last.values[ids] = self._clock
        self._reads.add(ids)

    def plan(self, resident, max_moves=None):
        return plan_by_keys(self._reads, resident, max_moves, self.capacity,
                            lambda res, cand: (self._last.get(res), self._last.get(cand)))


class LFUPolicy(Policy):
    """Plain LFU with exact counts: keeps the `capacity` rows read most often since the start; a
    just-read row comes in only if read more often than the resident row it displaces.
    State: one exact count per row id up to the largest seen (8 bytes each)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._counts = Counts()
        self._reads = Reads()

    def record(self, ids: np.ndarray) -> None:
        ids = check_ids("ids", ids)
        self._counts.grow(ids)
        self._counts.values[ids] += 1  # ids are distinct within a request
        self._reads.add(ids)

    def plan(self, resident, max_moves=None):
        return plan_by_keys(self._reads, resident, max_moves, self.capacity,
                            lambda res, cand: (self._counts.get(res), self._counts.get(cand)))


class RandomPolicy(Policy):
    """Random eviction: every row read since the last plan comes in (a random subset when more
    than fit) and uniformly random resident rows go out. Seeded, so runs repeat exactly."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity)
        self._rng = np.random.default_rng(seed)
        self._reads = Reads()

    def record(self, ids: np.ndarray) -> None:
        self._reads.add(check_ids("ids", ids))

    def plan(self, resident, max_moves=None):
        # candidates rank above every resident row (keys + 1): all come in while slots or victims last
        return plan_by_keys(self._reads, resident, max_moves, self.capacity,
                            lambda res, cand: (self._rng.random(len(res)), self._rng.random(len(cand)) + 1.0))
