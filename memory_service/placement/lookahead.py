"""The look-ahead: requests announced before they are read, and how soon each row is read
(the signal that takes `EngramPolicy`, memory_service/placement/engram.py, past plain LFU).
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import contains, sorted_unique


class Lookahead:
    """Requests announced by `expect` and not read yet, soonest first, each as the sorted ids (n,)
    of it no read has consumed. A request announced with a step gathers every announcement of
    that step (a trainer's step reaches each shard in parts, drained at different times) and takes
    its place among the other stepped ones by step; one without a step goes last. At most
    `max_requests` holding at most `max_ids` ids in all, the soonest dropped first (a request
    announced but never read must not hold its rows forever, and announcements of one step that
    keep naming new rows must not grow it without end; a request alone past `max_ids` keeps its
    `max_ids` smallest ids)."""

    def __init__(self, max_requests: int, max_ids: int = 1 << 22) -> None:
        if max_requests < 1 or max_ids < 1:
            raise ValueError(f"max_requests {max_requests} and max_ids {max_ids} must be >= 1")
        self.max_requests, self.max_ids = max_requests, max_ids
        self._requests: list[np.ndarray] = []
        self._steps: list[int | None] = []  # the step of each request (None: not told)
        self.num_ids = 0  # ids held over every request

    def __len__(self) -> int:
        return len(self._requests)

    def announce(self, ids: np.ndarray, step: int | None = None) -> None:
        ids = sorted_unique(ids)
        if step is not None and step in self._steps:
            at = self._steps.index(step)
            self.num_ids -= len(self._requests[at])
            self._requests[at] = sorted_unique(np.concatenate([self._requests[at], ids]))[:self.max_ids]
            self.num_ids += len(self._requests[at])
        else:
            at = len(self._steps)
            if step is not None:  # before the first later step (requests without a step stay after it)
                at = next((i for i, s in enumerate(self._steps) if s is not None and s > step), at)
            self._requests.insert(at, ids[:self.max_ids])
            self._steps.insert(at, step)
            self.num_ids += len(self._requests[at])
        while len(self._requests) > self.max_requests or self.num_ids > self.max_ids:
            self.num_ids -= len(self._requests[0])
            del self._requests[0], self._steps[0]

    def consume(self, ids: np.ndarray) -> None:
        """A read of ids (n,) fulfils each one's earliest announcement (a row announced for two
        requests is still about to be read after the first); requests left empty are dropped."""
        remaining = sorted_unique(ids)
        for i, request in enumerate(self._requests):
            if remaining.size == 0:
                break
            read = contains(remaining, request)
            if read.any():
                remaining = remaining[~contains(request[read], remaining)]
                self._requests[i] = request[~read]
        kept = [i for i, r in enumerate(self._requests) if r.size]
        if len(kept) < len(self._requests):
            self._requests = [self._requests[i] for i in kept]
            self._steps = [self._steps[i] for i in kept]
        self.num_ids = sum(len(r) for r in self._requests)

    def distance(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64: for each id, how many announced requests come before the earliest that
        reads it (0: the next one), or -1 when none does."""
        out = np.full(len(ids), -1, np.int64)
        if not self._requests or ids.size == 0:
            return out
        announced = np.concatenate(self._requests)  # (m,)
        position = np.repeat(np.arange(len(self._requests)), [len(r) for r in self._requests])  # (m,)
        order = np.lexsort((position, announced))  # by id, then earliest request first
        first = np.r_[True, announced[order][1:] != announced[order][:-1]]
        keys, nearest = announced[order][first], position[order][first]  # sorted distinct ids, their distance
        at = np.searchsorted(keys, ids).clip(max=len(keys) - 1)
        found = keys[at] == ids
        out[found] = nearest[at[found]]
        return out
