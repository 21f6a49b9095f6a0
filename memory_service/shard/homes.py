"""Homes: which rows a shard serves when rows move between cold and hot shards.

Every row has exactly one home. By the static rule it is cold shard id % num_cold; while it is
hot, it is hot shard id % num_hot instead. A cold shard keeps the set of its rows that moved away;
a hot shard keeps the set of rows it is home of. A request naming a row whose home is elsewhere
is refused whole with `RowsMoved` (gRPC ABORTED, like Redis Cluster's MOVED): the client refreshes
its hot map and re-routes, so no fetch sees a stale copy and no push lands on one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from memory_service.errors import RowsMoved
from memory_service.ids import contains

EMPTY = np.empty(0, dtype=np.int64)


@dataclass
class Homes:
    """The moving part of one shard's homes: `role` "cold" (rows moved away) or "hot" (rows held)."""

    role: str
    version: int = 0  # hot map version of the last move this shard took part in
    _sets: dict[str, np.ndarray] = field(default_factory=dict)  # table -> sorted ids (moved or held)
    # told the table whose set changed (the shard publishes it to same-host readers)
    on_change: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.role not in ("cold", "hot"):
            raise ValueError(f"shard role {self.role!r} must be 'cold' or 'hot'")

    def ids(self, table: str) -> np.ndarray:
        """Sorted ids: a cold shard's rows that moved away, a hot shard's rows it is home of."""
        return self._sets.get(table, EMPTY)

    def away(self, table: str, ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of `ids` this shard is not home of now (the static rule already checked)."""
        member = contains(self._sets.get(table, EMPTY), ids)
        return member if self.role == "cold" else ~member

    def check(self, table: str, ids: np.ndarray) -> None:
        """RowsMoved unless this shard is home of every id (n,) (the static rule already checked)."""
        away = self.away(table, ids)
        if away.any():
            where = "moved to a hot shard" if self.role == "cold" else "is not hot here"
            raise RowsMoved(f"moved: {self.version}: table {table!r} row {int(ids[away.argmax()])} {where}")

    def leave(self, table: str, ids: np.ndarray, version: int) -> None:
        """Rows `ids` (distinct) stop being served here."""
        held = self._sets.get(table, EMPTY)
        self._sets[table] = np.union1d(held, ids) if self.role == "cold" else np.setdiff1d(held, ids)
        self.version = max(self.version, version)
        if self.on_change is not None:
            self.on_change(table)

    def arrive(self, table: str, ids: np.ndarray, version: int) -> None:
        """Rows `ids` (distinct) are served here from now on."""
        held = self._sets.get(table, EMPTY)
        self._sets[table] = np.setdiff1d(held, ids) if self.role == "cold" else np.union1d(held, ids)
        self.version = max(self.version, version)
        if self.on_change is not None:
            self.on_change(table)

    def restore(self, table: str, ids: np.ndarray) -> None:
        """Sets the moving part of `table` to sorted ids `ids` (as `ids(table)` gave them), as a
        checkpoint stored it, on a cold or a hot shard alike."""
        self._sets[table] = ids

    def drop(self, table: str) -> None:
        self._sets.pop(table, None)

