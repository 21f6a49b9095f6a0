"""The read path of one table's rows: stored rows from the arena and, under it, the disk tier,
brought up to the committed step first; never-written rows computed from the seed.

Rows live in the arena (all-DRAM: every written row; disk-backed: the resident copies) and in the
disk tier. A read takes the arena's rows by slot and the rest in one batched LMDB read; when every
id is resident (the common case under a fitting budget) it touches neither LMDB nor a scatter. An
optimizer that catches up (dense Adam) first brings the stored rows a read gathers up to date, in
one batch (`RowWriter.catch_up_*`), and keeps the result.
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import sorted_unique
from memory_service.rows import InitialRows
from memory_service.storage.row_writer import RowWriter
from memory_service.storage.tiers.base import RowRecords
from memory_service.storage.tiers.disk import DiskTier
from memory_service.storage.tiers.dram import DramTier
from memory_service.storage.usage import TierCounters


class RowReader:
    """Reads one table's rows from `arena` and, when not None, `disk`, catching them up through
    `writer`; counts the ids read and found in `arena_counters` and `disk_counters`."""

    def __init__(self, init_rows: InitialRows, arena: DramTier, disk: DiskTier | None, writer: RowWriter,
                 arena_counters: TierCounters, disk_counters: TierCounters) -> None:
        self.init_rows, self.arena, self.disk, self.writer = init_rows, arena, disk, writer
        self.arena_counters, self.disk_counters = arena_counters, disk_counters
        self.rows_read = 0  # ids read since start
        self.hits = 0  # of those, ids found stored (the rest were computed from the seed)

    def read_arena(self, ids: np.ndarray, committed: int) -> tuple[np.ndarray, np.ndarray]:
        """An all-DRAM read of `ids` (n,) at step `committed` but for the never-written rows:
        (rows (n, width), their places unset; mask (n,) of the never-written ids)."""
        self.rows_read += len(ids)
        slots = self.arena.lookup(ids)  # (n,)
        if self.writer.catches_up:
            self.writer.catch_up_arena(slots[slots >= 0], committed)
        missing = slots < 0
        self.hits += len(ids) - int(np.count_nonzero(missing))
        if not missing.any():
            return self.arena.rows_at(slots), missing
        out = np.empty((len(ids), self.arena.width), dtype=np.float32)
        at = np.flatnonzero(~missing)  # (h,) positions of the stored rows
        self.arena.rows_into(slots[at], out, at)
        return out, missing

    def read_tiered(self, ids: np.ndarray, committed: int) -> tuple[np.ndarray, bool]:
        """(rows (n, width) of `ids` (n,) at step `committed`, whether the arena held every one)
        of a disk-backed store."""
        self.rows_read += len(ids)
        slots = self.arena.lookup(ids)  # (n,)
        hit = slots >= 0
        if hit.all():  # all in DRAM (the common case under a fitting budget): no LMDB, no scatter
            if self.writer.catches_up:
                none = RowRecords.empty(self.arena.width, self.arena.state_width)
                self.writer.catch_up_tiered(sorted_unique(slots), none.ids, none.rows, none.state, none.last,
                                            committed)
            self.arena_counters.hits += len(ids)
            self.hits += len(ids)
            return self.arena.rows_at(slots), True
        disk_ids = ids[~hit]  # (d,) repeats kept
        distinct = sorted_unique(disk_ids)  # (u,)
        found, rows, state, last = self.disk.get(distinct)  # records of distinct[found]
        if self.writer.catches_up:
            self.writer.catch_up_tiered(sorted_unique(slots[hit]), distinct[found], rows, state, last,
                                        committed)
        out = np.empty((len(ids), self.arena.width), dtype=np.float32)
        out[hit] = self.arena.rows_at(slots[hit])
        disk_rows = np.empty((len(distinct), self.arena.width), dtype=np.float32)  # (u, width)
        disk_rows[found] = rows
        disk_rows[~found] = self.init_rows(distinct[~found], remember=True)
        where = np.searchsorted(distinct, disk_ids)  # (d,)
        out[~hit] = disk_rows[where]
        self._count(int(np.count_nonzero(hit)), len(disk_ids), int(np.count_nonzero(found[where])))
        return out, False  # every row held in DRAM returned above

    def _count(self, num_arena: int, num_below: int, num_disk: int) -> None:
        """Counts a tiered read: `num_arena` ids found in the arena, `num_below` looked for in the
        disk tier and `num_disk` of those found there."""
        self.arena_counters.hits += num_arena
        self.arena_counters.misses += num_below
        self.disk_counters.hits += num_disk
        self.disk_counters.misses += num_below - num_disk
        self.hits += num_arena + num_disk
