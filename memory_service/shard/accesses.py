"""Accesses: the reads and look-aheads a shard served since placement last looked.

A shard that keeps them (`Shard(track_accesses=True)`: hot shards, and cold shards beside hot
ones) records each table's events here and the hot/cold migrator drains them. Events keep their
order, because a read fulfils the look-ahead announced before it, not one announced after.

What callers send lands here, so the log is bounded and expires (StorageConfig.access_log_ids,
access_log_expiry_s): at most `max_ids` ids and MAX_EVENTS events in all, the oldest events dropped
first (an event alone larger than the bound keeps its first `max_ids` ids), and none older than
`expiry_s` seconds. Placement is a hint, so a dropped event costs a less informed plan, never a
wrong answer. Before, each held fetch copied its ids here and 512 events per table of up to 4M ids
each could be kept (+1.9 GiB from 24 held fetches, held until a drain, whose reply then exceeded
the gRPC message limit). With `max_ids` <= config.MAX_ACCESS_LOG_IDS a drained log always fits one
DrainAccesses reply.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np

from memory_service.placement.policy import READ, UNTAGGED

MAX_EVENTS = 4096  # events kept in all, whatever their sizes


class Accesses:
    """(table, tag, ids) events in the order they came: (READ, a fetch's distinct ids) or (step or
    UNTAGGED, a look-ahead's ids); at most `max_ids` ids and MAX_EVENTS events, none older than
    `expiry_s` seconds, the oldest dropped first."""

    def __init__(self, max_ids: int = 1 << 22, expiry_s: float = 60.0) -> None:
        self.max_ids, self.expiry_s = max_ids, expiry_s
        self._events: deque[tuple[float, str, int, np.ndarray]] = deque()  # (monotonic time, table, tag, ids)
        self.num_ids = 0  # ids held
        self.dropped = 0  # events dropped unread (bound or expiry) since start

    def __len__(self) -> int:
        return len(self._events)

    @property
    def nbytes(self) -> int:
        """Bytes of the ids held."""
        return self.num_ids * 8

    def record(self, name: str, ids: np.ndarray) -> None:
        """A fetch of table `name` read `ids` (n,)."""
        self._add(name, READ, ids)  # distinct: the client deduplicates each request

    def expect(self, name: str, ids: np.ndarray, step: int | None) -> None:
        """A fetch of `step` (None: untagged) will read `ids` (n,) of table `name`."""
        self._add(name, UNTAGGED if step is None else step, ids)

    def drain(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """{table: its events since the last drain (and not expired), in order}."""
        self._expire(time.monotonic())
        drained: dict[str, list[tuple[int, np.ndarray]]] = {}
        for _, name, tag, ids in self._events:
            drained.setdefault(name, []).append((tag, ids))
        self._events.clear()
        self.num_ids = 0
        return drained

    def drop(self, name: str) -> None:
        """Forgets every event of table `name` (dropped)."""
        self._events = deque(e for e in self._events if e[1] != name)
        self.num_ids = sum(len(e[3]) for e in self._events)

    def _add(self, name: str, tag: int, ids: np.ndarray) -> None:
        now = time.monotonic()
        self._expire(now)
        ids = ids[:self.max_ids].copy()
        self._events.append((now, name, tag, ids))
        self.num_ids += len(ids)
        while self.num_ids > self.max_ids or len(self._events) > MAX_EVENTS:
            self._pop()

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.expiry_s:
            self._pop()

    def _pop(self) -> None:
        self.num_ids -= len(self._events.popleft()[3])
        self.dropped += 1
