"""What changes a table's written rows: the optimizer's updates, and dense Adam's catch-up of rows
behind the committed step, each applied to one batch and written back to the tier each row lives in.

Rows, optimizer state and last step move between tiers as exact copies, and the optimizer sees
the same batches whatever the tiers hold: dense Adam's catch-up is not batch-independent in the
last bit, so a read or push gathers every row it touches, from the arena and the disk tier, into
one batch. A tiered store thus ends bit-identical to an all-DRAM one given the same requests
(tests/memory_service/storage/test_tiered_store.py). Every change of a disk-backed table is told to its journal (`note`)
before it reaches the disk tier.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memory_service.ids import sorted_unique
from memory_service.native import kernels
from memory_service.rows import InitialRows
from memory_service.storage.optimizer import TableOptimizer
from memory_service.storage.residency import Residency
from memory_service.storage.tiers.disk import DiskTier
from memory_service.storage.tiers.dram import DramTier


@dataclass
class UpdateBatch:
    """An update computed but not stored (RowWriter.prepare): distinct `ids` (n,), their arena
    `slots` (n,) (-1: not resident), and their new `rows` (n, width), optimizer `state`
    (n, state_width) and `last` step (n,)."""

    ids: np.ndarray
    slots: np.ndarray
    rows: np.ndarray
    state: np.ndarray
    last: np.ndarray

    def first_non_finite(self) -> int | None:
        """Position of the first row whose new values or optimizer state are not finite, or None
        (the common case: two passes over the values, nothing else)."""
        if kernels.active():
            if kernels.all_finite(self.rows) and kernels.all_finite(self.state):
                return None
        elif np.isfinite(self.rows).all() and np.isfinite(self.state).all():
            return None
        bad = ~(np.isfinite(self.rows).all(axis=1) & np.isfinite(self.state).all(axis=1))
        return int(bad.argmax())


class RowWriter:
    """Applies `optimizer` to one table's rows in `arena` and, when not None, `disk` (the tier
    under it, which holds every written row). `note(kind, *fields)` is told each change of the
    disk-backed rows (the store's journal callback); `residency` takes rows just written to disk
    into the arena while it has room."""

    def __init__(self, optimizer: TableOptimizer, init_rows: InitialRows, arena: DramTier,
                 disk: DiskTier | None, residency: Residency, note: Callable[..., None]) -> None:
        self.optimizer, self.init_rows = optimizer, init_rows
        self.arena, self.disk, self.residency = arena, disk, residency
        self.note = note
        self.optimizer_rows = 0  # rows the optimizer processed: updated, or caught up on a read

    @property
    def catches_up(self) -> bool:
        """Whether rows must be brought up to the committed step before they are read."""
        return self.optimizer.catches_up

    # --- catch-up (reads) ---

    def catch_up_arena(self, slots: np.ndarray, committed: int) -> None:
        """Brings the rows at arena `slots` (n,) (repeats allowed) of an all-DRAM store up to
        step `committed`."""
        behind = sorted_unique(slots[self.arena.last_at(slots) < committed])  # (m,) as np.unique, by a sort
        if not behind.size:
            return
        arenas = self.arena.arenas()
        if arenas is None or not self.optimizer.catch_up_at(*arenas, behind, committed):
            rows, state, last = self.arena.records_at(behind)
            self.optimizer.catch_up(rows, state, last, committed)
            self.arena.write_at(behind, rows, state, last)
        self.optimizer_rows += behind.size

    def catch_up_tiered(self, arena_slots: np.ndarray, disk_ids: np.ndarray, rows: np.ndarray,
                        state: np.ndarray, last: np.ndarray, committed: int) -> None:
        """Brings written rows behind step `committed` up to it in one optimizer batch, as an
        all-DRAM store would: distinct `arena_slots` (a,) and the disk records of `disk_ids` (k,)
        (updated in place). Arena rows become dirty; disk rows are written back."""
        arena_slots = arena_slots[self.arena.last_at(arena_slots) < committed]
        behind = last < committed  # (k,)
        if not arena_slots.size and not behind.any():
            return
        arena_rows, arena_state, arena_last = self.arena.records_at(arena_slots)
        batch_rows = np.concatenate([arena_rows, rows[behind]])  # (a + b, width)
        batch_state = np.concatenate([arena_state, state[behind]])
        batch_last = np.concatenate([arena_last, last[behind]])
        self.optimizer.catch_up(batch_rows, batch_state, batch_last, committed)
        a = len(arena_slots)
        self.note("rows", np.concatenate([self.arena.ids_at(arena_slots), disk_ids[behind]]),
                  batch_rows, batch_state, batch_last)
        self.arena.write_at(arena_slots, batch_rows[:a], batch_state[:a], batch_last[:a])
        self.arena.mark_dirty(arena_slots)
        rows[behind], state[behind], last[behind] = batch_rows[a:], batch_state[a:], batch_last[a:]
        if a < len(batch_rows):
            self.disk.put(disk_ids[behind], batch_rows[a:], batch_state[a:], batch_last[a:])
        self.optimizer_rows += len(batch_rows)

    # --- updates (pushes): computed first (`prepare`), stored once every table of the request passed ---

    def prepare(self, ids: np.ndarray, grads: np.ndarray, step: int, lr: float) -> UpdateBatch:
        """The optimizer at `step` with learning rate `lr` over distinct `ids` (n,) with `grads`
        (n, width), in one batch, on gathered copies: resident rows from the arena, the others from
        the disk tier or initialised. Changes nothing; `write` stores the result."""
        n, width = len(ids), self.arena.width
        slots = self.arena.lookup(ids)  # (n,)
        resident = slots >= 0
        if resident.all():
            rows, state, last = self.arena.records_at(slots)
            found = np.zeros(0, bool)
        else:
            rows = np.empty((n, width), dtype=np.float32)
            state = np.empty((n, self.arena.state_width), dtype=np.float32)
            last = np.empty(n, dtype=np.int64)
            at = np.flatnonzero(resident)  # (r,) positions
            self.arena.records_into(slots[at], rows, state, last, at)
            other = np.flatnonzero(~resident)  # (o,) positions
            found = np.zeros(len(other), bool)
            if self.disk is not None:
                found, disk_rows, disk_state, disk_last = self.disk.get(ids[other])
                rows[other[found]], state[other[found]], last[other[found]] = disk_rows, disk_state, disk_last
            new = other[~found]
            rows[new], state[new], last[new] = self.initial(ids[new], step)
        self.optimizer.update(rows, state, last, grads, step, lr)
        return UpdateBatch(ids, slots, rows, state, last)

    def write(self, batch: UpdateBatch, log: tuple[int, float] | None) -> None:
        """Stores a prepared batch: resident rows in the arena (dirty when a disk tier is under it),
        never-written ones appended (all-DRAM), the others written to the disk tier with the step
        log entry `log` (and copied into the arena while it has room)."""
        ids, slots, rows, state, last = batch.ids, batch.slots, batch.rows, batch.state, batch.last
        resident = slots >= 0
        if self.disk is None:
            if not resident.all():
                slots = slots.copy()
                slots[~resident] = self.arena.append(ids[~resident], rows[~resident], state[~resident],
                                                     last[~resident])
                at = np.flatnonzero(resident)  # (r,) positions
                self.arena.write_from(slots[at], rows, state, last, at)
            else:
                self.arena.write_at(slots, rows, state, last)
            self.optimizer_rows += len(ids)
            return
        self.note("rows", ids, rows, state, last)
        self.arena.write_at(slots[resident], rows[resident], state[resident], last[resident])
        self.arena.mark_dirty(slots[resident])
        other = np.flatnonzero(~resident)
        if other.size:
            self.disk.put(ids[other], rows[other], state[other], last[other], log=log)
            self.residency.copy_in(ids[other], rows[other], state[other], last[other])
        elif log is not None:
            self.disk.save_log(np.array([log[0]]), np.array([log[1]]))
        self.optimizer_rows += len(ids)

    def initial(self, ids: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, state, last) of never-written `ids` (m,) updated at `step`: their initial row,
        zero state, and last step as if caught up to the step before the table's step."""
        rows = self.init_rows(ids)
        state = self.optimizer.initial_state(len(ids), self.arena.width)
        return rows, state, np.full(len(ids), max(max(self.optimizer.step, step) - 1, 0), dtype=np.int64)

    def last_of(self, ids: np.ndarray) -> np.ndarray:
        """Last step of each id (n,), -1 where never written."""
        slots = self.arena.lookup(ids)
        last = np.full(len(ids), -1, dtype=np.int64)
        last[slots >= 0] = self.arena.last_at(slots[slots >= 0])
        if self.disk is not None and (slots < 0).any():
            on_disk = np.flatnonzero(slots < 0)
            found, _, _, disk_last = self.disk.get(ids[on_disk])
            last[on_disk[found]] = disk_last
        return last
