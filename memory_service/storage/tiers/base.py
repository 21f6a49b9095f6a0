"""What every storage tier holds and the operations a store moves rows with.

A tier holds records: row id -> (row (width,) float32, optimizer state (state_width,) float32,
last step (int64): the step the row was last brought up to date). Every operation takes a batch of
ids and works on whole arrays, because a request carries thousands of rows and a per-row Python
call costs more than the row's arithmetic.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # eq on ndarray fields would be ambiguous
class RowRecords:
    """Rows with their optimizer state, as a tier holds them or a migration carries them:
    ids (n,) int64, rows (n, width) float32, state (n, state_width) float32, last (n,) int64."""

    ids: np.ndarray
    rows: np.ndarray
    state: np.ndarray
    last: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        assert self.rows.shape[0] == self.state.shape[0] == len(self.last) == n, "ragged records"

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, width: int, state_width: int) -> "RowRecords":
        return cls(np.empty(0, np.int64), np.empty((0, width), np.float32),
                   np.empty((0, state_width), np.float32), np.empty(0, np.int64))

    def take(self, index: np.ndarray) -> "RowRecords":
        """The records at `index` (a boolean mask or positions)."""
        return RowRecords(self.ids[index], self.rows[index], self.state[index], self.last[index])

    @classmethod
    def concat(cls, parts: list["RowRecords"]) -> "RowRecords":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "rows", "state", "last")))


class Tier(ABC):
    """One storage tier of one table's rows on one shard (DRAM arena, GPU arena, LMDB)."""

    name: str  # what stats call the tier

    def __init__(self, width: int, state_width: int) -> None:
        if width < 1 or state_width < 0:
            raise ValueError(f"row width {width} must be >= 1 and state width {state_width} >= 0")
        self.width, self.state_width = width, state_width

    @abstractmethod
    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ids (n,) int64 -> (found (n,) bool, rows (m, width), state (m, state_width), last (m,))
        where the m records are those of ids[found], in the order of `ids`. Repeats allowed."""

    @abstractmethod
    def put(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray) -> None:
        """Inserts or overwrites the records of distinct `ids` (n,)."""

    @abstractmethod
    def pop(self, ids: np.ndarray) -> RowRecords:
        """Removes the records of distinct `ids` (n,) the tier holds and returns them, in the
        order of `ids`; ids it does not hold are skipped."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """Every id held, (len,) int64 (in no particular order)."""

    @abstractmethod
    def __len__(self) -> int:
        """Records held."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the tier takes for its records (its own kind of memory: DRAM, GPU or disk)."""

    def get_records(self, ids: np.ndarray) -> RowRecords:
        """`get` as RowRecords of the ids found."""
        found, rows, state, last = self.get(ids)
        return RowRecords(ids[found], rows, state, last)
