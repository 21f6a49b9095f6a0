"""Which written rows of a disk-backed table the arena keeps, and the moves that keep it so.

On a cold shard with a disk directory the disk tier holds every written row and the arena above
it (DRAM, tiers/dram.py) copies of at most `capacity` of them. Which ones is the placement
`Policy`'s call (memory_service/placement/policy.py): requests only queue the ids they read or
announce (`tell`); the policy gets them in order at the next plan (`tell_policy`), and `place`,
run by the shard's background `Placer` between requests, applies its plan: evicted rows are
written back if dirty and dropped (demotions), admitted rows read from the disk tier
(promotions). `flush` writes every dirty copy back; `copy_in` puts rows a write just stored on
disk into the arena while it has room, as the next plan would.
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import sorted_unique
from memory_service.placement.policy import Policy, tell
from memory_service.storage.tiers.disk import DiskTier
from memory_service.storage.tiers.dram import DramTier
from memory_service.storage.usage import TierCounters


class Residency:
    """The arena's share of one table's rows over its disk tier (`disk` None: an all-DRAM store,
    whose arena holds every row and nothing moves). `policy` places rows (needed with `disk`);
    `counters` are the arena's, counting the moves."""

    def __init__(self, arena: DramTier, disk: DiskTier | None, policy: Policy | None,
                 counters: TierCounters) -> None:
        self.arena, self.disk, self.policy, self.counters = arena, disk, policy, counters
        self.capacity = arena.max_rows  # rows the arena may keep (None: no limit)
        # False once a plan moved nothing and no request came since: an idle table costs the
        # placer no planning (a plan sorts every resident id) and no memory for it. Requests that
        # may give a plan something to do set it.
        self.unsettled = True
        # What requests told placement, for the placer to hand the policy in order (reads and
        # announcements: a look-ahead policy pairs them): a request only appends its ids.
        self._told: list[tuple[int, np.ndarray]] = []  # (placement's READ or a look-ahead's tag, ids)
        self._told_ids = 0

    @property
    def room(self) -> int | float:
        """Rows the arena may still take (inf without a limit)."""
        return self.arena.room if self.capacity is None else self.capacity - len(self.arena)

    # --- what the policy hears ---

    def tell(self, tag: int, ids: np.ndarray) -> None:
        """Queues a read's (or an announcement's) ids for the policy; they reach it at the next
        plan (`tell_policy`), off the request path, or here once the queue holds more ids than
        the tier has rows (so it stays bounded when no placer runs)."""
        self._told.append((tag, np.array(ids, dtype=np.int64).reshape(-1)))
        self._told_ids += len(ids)
        if self._told_ids > max(self.policy.capacity, 1 << 16):
            self.tell_policy()

    def tell_policy(self) -> None:
        """Hands the policy the queued reads and announcements, in the order they came."""
        for tag, ids in self._told:
            tell(self.policy, tag, sorted_unique(ids))
        self._told, self._told_ids = [], 0

    def forget(self, ids: np.ndarray) -> None:
        """Distinct `ids` (n,) now live elsewhere: the policy no longer admits them."""
        self.tell_policy()
        self.policy.forget(ids)

    # --- moves ---

    def set_capacity(self, max_rows: int) -> None:
        """Rows the arena may keep from now on. Growing takes effect at once; shrinking once
        `place()` has evicted down to it."""
        self.capacity = max_rows
        self.unsettled = True
        if self.policy is not None:
            self.policy.capacity = max_rows
        if self.arena.max_rows is None or max_rows >= len(self.arena):
            self.arena.set_max_rows(max_rows)

    def place(self, max_moves: int | None = None) -> int:
        """Applies one placement plan (evictions, then at most `max_moves` admissions); returns
        the rows moved."""
        self.tell_policy()  # also when settled: reads of resident rows still reorder them
        if not self.unsettled:
            return 0
        resident = np.sort(self.arena.ids())
        admit, evict = self._checked_plan(resident, *self.policy.plan(resident, max_moves))
        self._evict(evict)
        if self.capacity is not None and self.arena.max_rows != self.capacity and len(self.arena) <= self.capacity:
            self.arena.set_max_rows(self.capacity)
        num_admitted = self._admit(admit[: max(int(min(self.room, len(admit))), 0)])
        moved = len(evict) + num_admitted
        self.unsettled = moved > 0
        return moved

    def _checked_plan(self, resident: np.ndarray, admit, evict) -> tuple[np.ndarray, np.ndarray]:
        admit = np.asarray(admit, dtype=np.int64).reshape(-1)
        evict = np.asarray(evict, dtype=np.int64).reshape(-1)
        name = type(self.policy).__name__
        if not np.isin(evict, resident).all() or len(np.unique(evict)) != len(evict):
            raise ValueError(f"{name}.plan evicts ids that are not resident, or repeats them")
        if np.isin(admit, resident).any() or len(np.unique(admit)) != len(admit):
            raise ValueError(f"{name}.plan admits resident ids, or repeats them")
        return admit, evict

    def _evict(self, ids: np.ndarray) -> None:
        """Drops resident `ids` from the arena, writing dirty ones back to the disk tier."""
        if not ids.size:
            return
        slots = self.arena.lookup(ids)
        dirty = self.arena.dirty_at(slots)
        if dirty.any():
            self.disk.put(ids[dirty], *self.arena.records_at(slots[dirty]))
            self.counters.writebacks += int(np.count_nonzero(dirty))
        self.arena.remove_slots(slots)
        self.counters.demotions += len(ids)

    def _admit(self, ids: np.ndarray) -> int:
        """Reads non-resident `ids` (n,) from the disk tier into the arena; returns how many it held."""
        found, rows, state, last = self.disk.get(ids)
        self.arena.append(ids[found], rows, state, last)
        # Never written, or moved to another shard: not worth an LMDB read every pass. A write
        # puts the rows it stores into DRAM itself (`copy_in`); a later read records them again.
        self.policy.forget(ids[~found])
        num_found = int(np.count_nonzero(found))
        self.counters.promotions += num_found
        return num_found

    def flush(self, ids: np.ndarray | None = None) -> None:
        """Writes every dirty arena row back to the disk tier (before a shard closes), or only
        the dirty ones among `ids` (n,) (a flush in chunks: ids no longer resident, or clean
        again, are skipped)."""
        if ids is None:
            slots = self.arena.dirty_slots()
        else:
            slots = self.arena.lookup(np.asarray(ids, dtype=np.int64))
            slots = slots[slots >= 0]
            slots = slots[self.arena.dirty_at(slots)]
        if slots.size:
            self.disk.put(self.arena.ids_at(slots), *self.arena.records_at(slots))
            self.arena.mark_clean(slots)
            self.counters.writebacks += len(slots)

    def copy_in(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray) -> None:
        """Appends the records of non-resident `ids` (n,) just written to the disk tier, clean, as
        far as the arena has room: what a placement pass would admit next (they were just used),
        without reading them back from LMDB."""
        fits = slice(0, max(int(min(self.room, len(ids))), 0))
        self.arena.append(ids[fits], rows[fits], state[fits], last[fits])
