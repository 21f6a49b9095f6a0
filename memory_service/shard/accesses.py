"""Accesses: the reads and look-aheads a shard served since placement last looked.

A shard that keeps them (`Shard(track_accesses=True)`: hot shards, and cold shards beside hot
ones) records each table's events here and the hot/cold migrator drains them. Events keep their
order, because a read fulfils the look-ahead announced before it, not one announced after.
"""
from __future__ import annotations

import numpy as np

from memory_service.placement.policy import READ, UNTAGGED


class Accesses:
    """Each table's (tag, ids) events in the order they came: (READ, a fetch's distinct ids) or
    (step or UNTAGGED, a look-ahead's ids); at most MAX_EVENTS per table, the oldest dropped first."""

    MAX_EVENTS = 512

    def __init__(self) -> None:
        self._events: dict[str, list[tuple[int, np.ndarray]]] = {}

    def record(self, name: str, ids: np.ndarray) -> None:
        """A fetch of table `name` read `ids` (n,)."""
        self._add(name, READ, ids)  # distinct: the client deduplicates each request

    def expect(self, name: str, ids: np.ndarray, step: int | None) -> None:
        """A fetch of `step` (None: untagged) will read `ids` (n,) of table `name`."""
        self._add(name, UNTAGGED if step is None else step, ids)

    def drain(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """{table: its events since the last drain, in order}."""
        drained, self._events = self._events, {}
        return drained

    def drop(self, name: str) -> None:
        self._events.pop(name, None)

    def _add(self, name: str, tag: int, ids: np.ndarray) -> None:
        events = self._events.setdefault(name, [])
        events.append((tag, ids.copy()))
        del events[:-self.MAX_EVENTS]
