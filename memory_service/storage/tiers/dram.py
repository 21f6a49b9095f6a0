"""The DRAM arena: a table's rows in host DRAM, in growable numpy arenas found through `SlotIndex`
(memory_service/ids.py).

Records live in arenas ids (cap,), rows (cap, width), state (cap, state_width), last (cap,) and a
dirty flag (cap,) (the row is newer than its copy in the tier below), at slots 0..len-1: removing
records moves the last ones into the holes, so the arenas stay dense and a tier with a row budget
never touches more memory than its rows need. `SlotIndex` finds slots with whole-array numpy
probing: with 1M rows written it finds 16k ids in ~1 ms where a Python dict took 12 ms (2-core VM;
tests/memory_service/storage/test_store.py prints the 16k read and update times).

Besides the `Tier` operations the arena offers slot-level access (`lookup`, `rows_at`,
`records_at`, `write_at`), which the store's read and update paths use so that a read gathers only
the rows, not their optimizer state. `DeviceTier` (device.py) keeps rows and state on a torch device and
overrides exactly the methods that touch them.
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import MIN_INDEX_BITS, SlotIndex
from memory_service.native import kernels
from memory_service.storage.tiers.base import RowRecords, Tier
from memory_service.storage.tiers.shared_arena import SharedTable
from memory_service.storage.usage import DRAM_TIER

class DramTier(Tier):
    """A table's records in host DRAM; at most `max_rows` of them when given (a DRAM budget).
    With `shared`, rows, their last steps and the index live in that table's shared-memory files
    (storage/tiers/shared_arena.py), where same-host clients read them."""

    name = DRAM_TIER

    def __init__(self, width: int, state_width: int, max_rows: int | None = None,
                 shared: SharedTable | None = None) -> None:
        super().__init__(width, state_width)
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"max_rows {max_rows} must be >= 0")
        self.max_rows = max_rows
        self.shared = shared
        self._index = SlotIndex(alloc=None if shared is None else shared.new_index)
        self._ids = np.empty(0, dtype=np.int64)  # (cap,) row id of each slot
        self._last = np.empty(0, dtype=np.int64)  # (cap,) step each row was last brought up to date
        self._dirty = np.empty(0, dtype=bool)  # (cap,) newer than the tier below's copy
        self._alloc_payload(0)
        if shared is not None:
            self._rows, self._last = shared.new_rows(0, width)

    @staticmethod
    def row_nbytes(width: int, state_width: int) -> int:
        """Bytes a row takes in the arenas (its share of the index apart): id, last step, dirty
        flag, row and optimizer state."""
        return 8 + 8 + 1 + 4 * (width + state_width)

    @staticmethod
    def rows_within(budget_bytes: int, width: int, state_width: int) -> int:
        """The most rows a tier of this kind keeps in `budget_bytes`: arenas plus index."""
        per_row = DramTier.row_nbytes(width, state_width)
        best = 0
        for bits in range(MIN_INDEX_BITS, 63):
            index_bytes = 16 << bits
            if index_bytes > budget_bytes:
                break
            best = max(best, min(1 << (bits - 1), (budget_bytes - index_bytes) // per_row))
        return best

    # --- the payload (rows and state): numpy here, torch tensors in DeviceTier ---

    def _alloc_payload(self, capacity: int) -> None:
        """(Re)allocates rows (capacity, width) and state (capacity, state_width), keeping the
        first len(self) records."""
        used = len(self)
        rows = np.empty((capacity, self.width), dtype=np.float32)
        state = np.empty((capacity, self.state_width), dtype=np.float32)
        if used:
            rows[:used], state[:used] = self._rows[:used], self._state[:used]
        self._rows, self._state = rows, state

    def _move_payload(self, src: np.ndarray, dst: np.ndarray) -> None:
        self._rows[dst], self._state[dst] = self._rows[src], self._state[src]

    @property
    def payload_nbytes(self) -> int:
        return self._rows.nbytes + self._state.nbytes

    @property
    def state_nbytes(self) -> int:
        """Bytes of the optimizer-state arena (capacity, not rows held)."""
        return self._state.nbytes

    def rows_at(self, slots: np.ndarray) -> np.ndarray:
        """Rows at `slots` (m,) -> (m, width) float32 (a copy)."""
        if kernels.active():  # a memcpy per row
            return kernels.gather(self._rows, slots)
        return np.take(self._rows, slots, axis=0)  # ~3x faster than self._rows[slots] here

    def records_at(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows (m, width), state (m, state_width), last (m,)) at `slots` (m,): copies."""
        if kernels.active():
            return (kernels.gather(self._rows, slots), kernels.gather(self._state, slots),
                    kernels.gather(self._last, slots))
        return self._rows[slots], self._state[slots], self._last[slots]

    def _numpy_loops(self) -> bool:
        """Whether the compiled loops run on this tier's arenas (numpy arrays, not DeviceTier's tensors)."""
        return kernels.active() and isinstance(self._rows, np.ndarray)

    def records_into(self, slots: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray,
                     positions: np.ndarray) -> None:
        """rows[positions], state[positions], last[positions] = the records at `slots` (m,): a
        batch's resident part gathered straight into place (no temporary, no masked copy)."""
        if self._numpy_loops() and kernels.takes(rows, state) and last.dtype == np.int64 and last.flags.c_contiguous:
            kernels.gather(self._rows, slots, rows, positions)
            kernels.gather(self._state, slots, state, positions)
            kernels.gather(self._last, slots, last, positions)
            return
        rows[positions], state[positions], last[positions] = self.records_at(slots)

    def rows_into(self, slots: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        """out[positions] = the rows at `slots` (m,), straight into place."""
        if self._numpy_loops() and kernels.takes(out):
            kernels.gather(self._rows, slots, out, positions)
            return
        out[positions] = self.rows_at(slots)

    def write_from(self, slots: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray,
                   positions: np.ndarray) -> None:
        """Overwrites the records at distinct `slots` (m,) with rows[positions], state[positions],
        last[positions] (no masked copy of the batch first)."""
        if self._numpy_loops() and kernels.takes(rows, state) and last.dtype == np.int64:
            kernels.scatter(self._rows, slots, rows, positions)
            kernels.scatter(self._state, slots, state, positions)
            kernels.scatter(self._last, slots, last, positions)
            return
        self.write_at(slots, rows[positions], state[positions], last[positions])

    def write_at(self, slots: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray) -> None:
        """Overwrites the records at distinct `slots` (m,)."""
        m = len(slots)
        if kernels.active() and rows.shape == (m, self.width) and state.shape == (m, self.state_width) \
                and np.shape(last) == (m,):
            kernels.scatter(self._rows, slots, rows)
            kernels.scatter(self._state, slots, state)
            kernels.scatter(self._last, slots, last)
            return
        self._rows[slots], self._state[slots], self._last[slots] = rows, state, last

    def arenas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The live arenas rows (cap, width), state (cap, state_width), last (cap,), for batch
        loops that update records in place by slot (the compiled catch-up); None where the
        payload is not a numpy array (DeviceTier's tensors)."""
        if not isinstance(self._rows, np.ndarray):
            return None
        return self._rows, self._state, self._last

    # --- slots ---

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int64 -> (n,) slots, -1 where the tier has no record."""
        return self._index.lookup(ids)

    def last_at(self, slots: np.ndarray) -> np.ndarray:
        return self._last[slots]

    @property
    def room(self) -> int | float:
        """Records that can still be added (inf without a row limit)."""
        return float("inf") if self.max_rows is None else self.max_rows - len(self)

    def append(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray,
               dirty: bool = False) -> np.ndarray:
        """Adds records of distinct ids (m,) the tier does not hold; returns their slots (m,)."""
        first, size = len(self), len(self) + len(ids)
        if self.max_rows is not None and size > self.max_rows:
            raise ValueError(f"{self.name} tier full: {first} rows + {len(ids)} new > max_rows {self.max_rows}")
        if size > len(self._ids):
            capacity = max(size, 2 * len(self._ids), 1024)
            self._reserve(capacity if self.max_rows is None else min(capacity, self.max_rows))
        slots = np.arange(first, size, dtype=np.int64)
        self._ids[slots] = ids
        self._dirty[slots] = dirty
        self.write_at(slots, rows, state, last)
        self._index.insert(ids, slots)
        return slots

    def _reserve(self, capacity: int) -> None:
        """Arenas of `capacity` slots (>= len(self)), keeping the records."""
        used = len(self)
        for name in ("_ids", "_dirty") if self.shared is not None else ("_ids", "_last", "_dirty"):
            old = getattr(self, name)
            new = np.empty(capacity, dtype=old.dtype)
            new[:used] = old[:used]
            setattr(self, name, new)
        if self.shared is None:
            self._alloc_payload(capacity)
            return
        rows, last = self.shared.new_rows(capacity, self.width)
        rows[:used], last[:used] = self._rows[:used], self._last[:used]
        state = np.empty((capacity, self.state_width), dtype=np.float32)
        state[:used] = self._state[:used]
        self._rows, self._last, self._state = rows, last, state

    def set_max_rows(self, max_rows: int | None) -> None:
        """A new row limit (>= len(self)); arenas and index shrink to it when they are larger."""
        if max_rows is not None and max_rows < len(self):
            raise ValueError(f"max_rows {max_rows} < {len(self)} rows held: evict first")
        self.max_rows = max_rows
        if max_rows is not None and len(self._ids) > max_rows:
            self._reserve(max(max_rows, len(self)))
        if max_rows is not None and self._index.nbytes > SlotIndex.nbytes_for(max_rows):
            self._index.fit(max_rows)

    # --- dirty flags ---

    def mark_dirty(self, slots: np.ndarray) -> None:
        self._dirty[slots] = True

    def dirty_at(self, slots: np.ndarray) -> np.ndarray:
        return self._dirty[slots]

    def dirty_slots(self) -> np.ndarray:
        """Slots (d,) of the records newer than the tier below's copy."""
        return np.flatnonzero(self._dirty[: len(self)])

    def mark_clean(self, slots: np.ndarray) -> None:
        self._dirty[slots] = False

    @property
    def num_dirty(self) -> int:
        return int(np.count_nonzero(self._dirty[: len(self)]))

    # --- Tier ---

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        slots = self.lookup(ids)
        found = slots >= 0
        return (found, *self.records_at(slots[found]))

    def put(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray,
            dirty: bool = False) -> None:
        """Inserts or overwrites records of distinct ids (n,); their dirty flag becomes `dirty`."""
        slots = self.lookup(ids)
        known = slots >= 0
        if known.any():
            self.write_at(slots[known], rows[known], state[known], last[known])
            self._dirty[slots[known]] = dirty
        if not known.all():
            new = ~known
            self.append(ids[new], rows[new], state[new], last[new], dirty)

    def pop(self, ids: np.ndarray) -> RowRecords:
        slots = self.lookup(ids)
        found = slots >= 0
        slots = slots[found]
        records = RowRecords(ids[found], *self.records_at(slots))
        self.remove_slots(slots)
        return records

    def remove_slots(self, slots: np.ndarray) -> None:
        """Drops the records at distinct `slots` (k,), moving the last records into the holes."""
        size = len(self)
        keep = size - len(slots)
        self._index.remove(self._ids[slots])
        holes = slots[slots < keep]  # (h,) slots to refill
        tail = np.arange(keep, size)
        movers = tail[~np.isin(tail, slots)]  # (h,) surviving records beyond the new end
        if holes.size:
            self._ids[holes], self._last[holes], self._dirty[holes] = (
                self._ids[movers], self._last[movers], self._dirty[movers])
            self._move_payload(movers, holes)
            self._index.move(self._ids[holes], holes)

    def ids(self) -> np.ndarray:
        return self._ids[: len(self)].copy()

    def ids_at(self, slots: np.ndarray) -> np.ndarray:
        return self._ids[slots]

    def __len__(self) -> int:
        return self._index.size

    @property
    def nbytes(self) -> int:
        """Arena capacity (up to 2x the rows held without a row limit) and index."""
        return (self._ids.nbytes + self._last.nbytes + self._dirty.nbytes + self.payload_nbytes
                + self._index.nbytes)
