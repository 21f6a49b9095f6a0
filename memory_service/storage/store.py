"""One table's rows on one shard: lazily materialised rows and their optimizer state, in tiers.

A row costs memory only once a push has written it; until then a read returns
`init_rows(seed, id)`, the value it would have had, so an untouched 100M-row table costs nothing
and a row starts identical whatever the number of shards. Written rows live in a warm tier (DRAM
arenas, memory_service/storage/tiers/dram.py) and, on a cold shard with a disk directory, in a cold tier
(LMDB, tiers/cold.py) under it:

- The cold tier holds every written row; the warm tier holds at most its row budget of them, a
  copy that is authoritative while resident and marked dirty once it is newer than the cold copy.
- Reads take warm rows from DRAM and the rest in one batched LMDB read; never-written rows are
  computed. Writes update resident rows in DRAM (dirty) and write the others to LMDB, copied
  into DRAM only as far as it has room, so the DRAM budget holds even when one push writes more
  rows than fit.
- Which rows the warm tier keeps is the placement `Policy`'s call (memory_service/placement/policy.py):
  every read's distinct ids are recorded (queued by the request, handed to the policy by the
  placer, off the request path), look-ahead fetches are announced with `expect`, and
  `place()` (run by the shard's background `Placer`, never inside a request) applies its plan:
  evicted rows are written back if dirty and dropped, admitted rows read from LMDB.

Rows, optimizer state and last step move between tiers as exact copies, and the optimizer sees
the same batches whatever the tiers hold (dense Adam's catch-up is not batch-independent in the
last bit, so a read or push gathers every row it touches into one batch), so a tiered store ends
bit-identical to an all-DRAM one given the same requests (tests/test_tiered_store.py).

Without a cold tier (the default) the store is the all-DRAM store it always was: every row in the
warm arena, unbounded, read and updated in place by slot.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from memory_service.config import TableConfig
from memory_service.storage.optimizer import make_optimizer
from memory_service.placement.policy import READ, UNTAGGED, Policy, sorted_unique, tell
from memory_service.rows import InitialRows, initial_rows_many
from memory_service.storage.tiers.base import RowRecords
from memory_service.storage.tiers.disk import DiskTier
from memory_service.storage.tiers.dram import DramTier
from memory_service.storage.usage import DISK_TIER, DRAM_TIER, TierUsage


@dataclass
class TierCounters:
    """Since the store was opened: ids read that a tier held (hits) or not (misses, looked for
    below), and rows moved into (promotions) and out of (demotions) the tier."""

    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    writebacks: int = 0  # dirty rows written to the tier below when demoted or flushed


def state_width_of(cfg: TableConfig) -> int:
    """float32 optimizer-state values per row of the table."""
    return make_optimizer(cfg.optimizer).state_width(cfg.width)


class TableStore:
    """The rows of one table held by one shard, and their optimizer state.

    `warm`: the DRAM tier (default: an unbounded DramTier). `cold`: the LMDB tier under it, or
    None for an all-DRAM store. `policy`: places rows between them (needed with `cold`)."""

    def __init__(self, cfg: TableConfig, warm: DramTier | None = None, cold: DiskTier | None = None,
                 policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.optimizer = make_optimizer(cfg.optimizer)
        self._init_rows = InitialRows(cfg.seed, cfg.width, cfg.init_scale)  # never-written rows' values
        self._state_width = self.optimizer.state_width(cfg.width)
        self.warm = warm if warm is not None else DramTier(cfg.width, self._state_width)
        for tier in (self.warm, cold):
            if tier is not None and (tier.width, tier.state_width) != (cfg.width, self._state_width):
                raise ValueError(f"table {cfg.name!r}: {tier.name} tier holds width {tier.width} + state "
                                 f"{tier.state_width}, the table needs {cfg.width} + {self._state_width}")
        if cold is not None and policy is None:
            raise ValueError(f"table {cfg.name!r}: a store with a cold tier needs a placement policy")
        self.cold = cold
        self.policy = policy
        self.warm_counters, self.cold_counters = TierCounters(), TierCounters()
        self.committed = 0  # the last complete step: reads are brought up to it (see `commit`)
        self.optimizer_rows = 0  # rows the optimizer processed: updated, or caught up on a read
        self.rows_read = 0  # ids read since start
        self.hits = 0  # of those, ids found stored (the rest were computed from the seed)
        self._capacity = self.warm.max_rows  # rows the warm tier may keep (None: no limit)
        # False once a plan moved nothing and no request came since: an idle table costs the
        # placer no planning (a plan sorts every resident id) and no memory for it.
        self._unsettled = True
        # What requests told placement, for the placer to hand the policy in order (reads and
        # announcements: a look-ahead policy pairs them): a request only appends its ids.
        self._told: list[tuple[int, np.ndarray]] = []  # (placement's READ or a look-ahead's tag, ids)
        self._told_ids = 0
        self.closed = False  # set when the table is dropped or its shard closes
        # Told every change of the table's durable state as it happens (a cold shard's Journal
        # logs them before they reach LMDB): journal(kind, *fields) with kind "rows" (ids, rows,
        # state, last: after-images), "step" (step, lr) or "commit" (step). None: nobody listens.
        self.journal: Callable[..., None] | None = None
        if cold is not None:
            self._load_log()

    def close(self, flush: bool = True) -> None:
        """Retires the store, first writing dirty warm rows back when `flush` (a dropped table's
        rows are not worth writing)."""
        if flush:
            self.flush()
        self.closed = True

    @property
    def step(self) -> int:
        """The largest table step pushed so far (0 before any push)."""
        return self.optimizer.step

    @property
    def num_materialized(self) -> int:
        """Rows written (the cold tier holds every one; the warm tier copies of some)."""
        return len(self.cold) if self.cold is not None else len(self.warm)

    @property
    def nbytes(self) -> int:
        """Bytes held: the warm arenas (capacity, up to 2x the rows without a budget) and index,
        plus the cold tier's pages on disk."""
        return self.warm.nbytes + (self.cold.nbytes if self.cold is not None else 0)

    @property
    def state_nbytes(self) -> int:
        """Bytes of the warm optimizer-state arena (part of `nbytes`)."""
        return self.warm.state_nbytes

    # --- reads ---

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (n,) int64 in range -> (n, width) float32, as they stand at the table's
        step: an optimizer that catches up (dense Adam) first brings the written rows among them
        up to date, and keeps the result. Never-written rows are computed, not stored."""
        if self.cold is None:
            return TableStore.read_many({self.cfg.name: (self, ids)})[self.cfg.name]
        self.rows_read += len(ids)
        out, all_warm = self._read_tiered(ids)
        self._tell(READ, ids)
        # A read of resident rows alone gives a plan nothing new to admit (and evictions come
        # only with admissions or a smaller capacity): no pass needed for it.
        self._unsettled |= not all_warm
        return out

    @staticmethod
    def read_many(requests: dict[str, tuple["TableStore", np.ndarray]]) -> dict[str, np.ndarray]:
        """`store.read(ids)` of each {table: (store, ids)}, the never-written rows of the all-DRAM
        ones computed in one pass (`initial_rows_many`): for the small requests of generation a
        pass costs the same for 1 row as for 16, so one per table made a fetch of 8 tables x 1 row
        cost 1.07 ms of Philox where one pass costs 0.21."""
        out, pending = {}, []
        for name, (store, ids) in requests.items():
            if store.cold is not None:
                out[name] = store.read(ids)
                continue
            store.rows_read += len(ids)
            out[name], missing = store._read_written(ids)
            if missing.any():
                pending.append((name, store, ids[missing], missing))
        computed = initial_rows_many([(store._init_rows, ids) for _, store, ids, _ in pending], remember=True)
        for (name, _, _, missing), rows in zip(pending, computed):
            out[name][missing] = rows  # their first push reuses them
        return out

    def _read_written(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An all-DRAM read but for the never-written rows: (rows (n, width), their places unset;
        mask (n,) of the never-written ids)."""
        slots = self.warm.lookup(ids)  # (n,)
        if self.optimizer.catches_up:
            self._catch_up_warm(slots[slots >= 0])
        missing = slots < 0
        self.hits += len(ids) - int(np.count_nonzero(missing))
        if not missing.any():
            return self.warm.rows_at(slots), missing
        out = np.empty((len(ids), self.cfg.width), dtype=np.float32)
        out[~missing] = self.warm.rows_at(slots[~missing])
        return out, missing

    def _catch_up_warm(self, slots: np.ndarray) -> None:
        """Brings the rows at warm `slots` (n,) (repeats allowed) up to the table's step."""
        behind = np.unique(slots[self.warm.last_at(slots) < self.committed])  # (m,)
        if not behind.size:
            return
        rows, state, last = self.warm.records_at(behind)
        self.optimizer.catch_up(rows, state, last, self.committed)
        self.warm.write_at(behind, rows, state, last)
        self.optimizer_rows += behind.size

    def _read_tiered(self, ids: np.ndarray) -> tuple[np.ndarray, bool]:
        """(rows of `ids`, whether the warm tier held every one)."""
        slots = self.warm.lookup(ids)  # (n,)
        hit = slots >= 0
        if hit.all():  # all in DRAM (the common case under a fitting budget): no LMDB, no scatter
            if self.optimizer.catches_up:
                none = RowRecords.empty(self.cfg.width, self._state_width)
                self._catch_up_tiered(sorted_unique(slots), none.ids, none.rows, none.state, none.last)
            self.warm_counters.hits += len(ids)
            self.hits += len(ids)
            return self.warm.rows_at(slots), True
        cold_ids = ids[~hit]  # (c,) repeats kept
        distinct = sorted_unique(cold_ids)  # (u,)
        found, rows, state, last = self.cold.get(distinct)  # records of distinct[found]
        if self.optimizer.catches_up:
            self._catch_up_tiered(sorted_unique(slots[hit]), distinct[found], rows, state, last)
        out = np.empty((len(ids), self.cfg.width), dtype=np.float32)
        out[hit] = self.warm.rows_at(slots[hit])
        cold_rows = np.empty((len(distinct), self.cfg.width), dtype=np.float32)  # (u, width)
        cold_rows[found] = rows
        cold_rows[~found] = self._init_rows(distinct[~found], remember=True)
        where = np.searchsorted(distinct, cold_ids)  # (c,)
        out[~hit] = cold_rows[where]
        num_warm, num_cold = int(np.count_nonzero(hit)), int(np.count_nonzero(found[where]))
        self.warm_counters.hits += num_warm
        self.warm_counters.misses += len(cold_ids)
        self.cold_counters.hits += num_cold
        self.cold_counters.misses += len(cold_ids) - num_cold
        self.hits += num_warm + num_cold
        return out, False  # every row held in DRAM returned above

    def _catch_up_tiered(self, warm_slots: np.ndarray, cold_ids: np.ndarray, rows: np.ndarray,
                         state: np.ndarray, last: np.ndarray) -> None:
        """Brings written rows behind the table's step up to it in one optimizer batch, as an
        all-DRAM store would: distinct `warm_slots` (w,) and the cold records of `cold_ids` (k,)
        (updated in place). Warm rows become dirty; cold rows are written back."""
        warm_slots = warm_slots[self.warm.last_at(warm_slots) < self.committed]
        behind = last < self.committed  # (k,)
        if not warm_slots.size and not behind.any():
            return
        warm_rows, warm_state, warm_last = self.warm.records_at(warm_slots)
        batch_rows = np.concatenate([warm_rows, rows[behind]])
        batch_state = np.concatenate([warm_state, state[behind]])
        batch_last = np.concatenate([warm_last, last[behind]])
        self.optimizer.catch_up(batch_rows, batch_state, batch_last, self.committed)
        w = len(warm_slots)
        self._note("rows", np.concatenate([self.warm.ids_at(warm_slots), cold_ids[behind]]),
                   batch_rows, batch_state, batch_last)
        self.warm.write_at(warm_slots, batch_rows[:w], batch_state[:w], batch_last[:w])
        self.warm.mark_dirty(warm_slots)
        rows[behind], state[behind], last[behind] = batch_rows[w:], batch_state[w:], batch_last[w:]
        if w < len(batch_rows):
            self.cold.put(cold_ids[behind], batch_rows[w:], batch_state[w:], batch_last[w:])
        self.optimizer_rows += len(batch_rows)

    def expect(self, ids: np.ndarray, step: int | None = None) -> None:
        """Ids (n,) the fetch of `step` (a held fetch, or an announced one) will read: the
        policy's look-ahead (see Policy.expect)."""
        if self.policy is not None:
            self._tell(UNTAGGED if step is None else step, ids)
            self._unsettled = True

    def _tell(self, tag: int, ids: np.ndarray) -> None:
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

    # --- writes ---

    def check_push(self, ids: np.ndarray, step: int, lr: float | None) -> None:
        """ValueError unless a push of distinct `ids` (n,) at `step` with `lr` can be applied:
        the step log accepts it and, for an optimizer that catches up, no row already took a
        gradient at `step` (the update is not additive: the pushes of one step must be summed)."""
        self.optimizer.checked_lr(step, lr)
        if self.optimizer.catches_up and len(ids):
            done = self._last_of(ids) >= step
            if done.any():
                raise ValueError(f"row id {ids[done.argmax()]} already took a gradient at step "
                                 f"{step}: send each step's gradients of a row in one push")

    def _last_of(self, ids: np.ndarray) -> np.ndarray:
        """Last step of each id (n,), -1 where never written."""
        slots = self.warm.lookup(ids)
        last = np.full(len(ids), -1, dtype=np.int64)
        last[slots >= 0] = self.warm.last_at(slots[slots >= 0])
        if self.cold is not None and (slots < 0).any():
            cold = np.flatnonzero(slots < 0)
            found, _, _, cold_last = self.cold.get(ids[cold])
            last[cold[found]] = cold_last
        return last

    def record_step(self, step: int, lr: float | None) -> None:
        """Logs table `step` and its learning rate (a push, possibly empty, arrived for it)."""
        new = self._is_new_step(step)
        self.optimizer.record_step(step, lr)
        if new and self.cold is not None:
            self._note("step", step, self.optimizer.lr_at(step))
            self.cold.save_log(np.array([step]), np.array([self.optimizer.lr_at(step)]))

    def _is_new_step(self, step: int) -> bool:
        return step > self.step or math.isnan(self.optimizer.lr_at(step))

    def commit(self, step: int, lr: float | None) -> None:
        """Step `step` is complete: every gradient of it arrived. Reads see it (rows are caught up
        to it) from now on; logs the step with `lr` if no push did."""
        if step > self.step:
            self.record_step(step, lr)
        else:
            self.optimizer.checked_lr(step, lr)
        self._set_committed(step)

    def _set_committed(self, step: int) -> None:
        if step > self.committed:
            self.committed = step
            self._note("commit", step)

    def update(self, ids: np.ndarray, grads: np.ndarray, step: int, lr: float | None = None,
               commit: bool = True) -> None:
        """Applies the optimizer at table `step` with learning rate `lr` (None: the configured one)
        to distinct `ids` (n,) with `grads` (n, width); with `commit`, the step is complete (see
        `commit`), else more of its gradients may come."""
        if commit:
            self._set_committed(step)
        if self.cold is None:
            self.optimizer.record_step(step, lr)
            self._update_warm(ids, grads, step)
        else:
            new = self._is_new_step(step)
            self.optimizer.record_step(step, lr)
            if new:
                self._note("step", step, self.optimizer.lr_at(step))
            self._update_tiered(ids, grads, step, (step, self.optimizer.lr_at(step)) if new else None)
            self._unsettled = True  # rows read before they were written can be admitted now
        self.optimizer_rows += len(ids)

    def _update_warm(self, ids: np.ndarray, grads: np.ndarray, step: int) -> None:
        slots = self.warm.lookup(ids)  # (n,)
        missing = slots < 0
        if missing.any():
            new = ids[missing]
            slots[missing] = self.warm.append(new, *self._initial(new))
        rows, state, last = self.warm.records_at(slots)  # gathered copies
        self.optimizer.update(rows, state, last, grads, step)
        self.warm.write_at(slots, rows, state, last)

    def _initial(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, state, last) of never-written `ids` (m,): their initial row, zero state, and
        last step as if caught up to the step before the current one."""
        rows = self._init_rows(ids)
        state = self.optimizer.initial_state(len(ids), self.cfg.width)
        return rows, state, np.full(len(ids), max(self.step - 1, 0), dtype=np.int64)

    def _update_tiered(self, ids: np.ndarray, grads: np.ndarray, step: int,
                       log: tuple[int, float] | None) -> None:
        """One optimizer batch over every id: resident rows updated in DRAM (dirty), the others
        read from LMDB (or initialised) and written back there with the step log entry (and
        copied into DRAM while it has room)."""
        n, width = len(ids), self.cfg.width
        slots = self.warm.lookup(ids)  # (n,)
        resident = slots >= 0
        rows = np.empty((n, width), dtype=np.float32)
        state = np.empty((n, self._state_width), dtype=np.float32)
        last = np.empty(n, dtype=np.int64)
        rows[resident], state[resident], last[resident] = self.warm.records_at(slots[resident])
        other = np.flatnonzero(~resident)  # (o,) positions
        found, cold_rows, cold_state, cold_last = self.cold.get(ids[other])
        rows[other[found]], state[other[found]], last[other[found]] = cold_rows, cold_state, cold_last
        new = other[~found]
        rows[new], state[new], last[new] = self._initial(ids[new])
        self.optimizer.update(rows, state, last, grads, step)
        self._note("rows", ids, rows, state, last)
        self.warm.write_at(slots[resident], rows[resident], state[resident], last[resident])
        self.warm.mark_dirty(slots[resident])
        if other.size:
            self.cold.put(ids[other], rows[other], state[other], last[other], log=log)
            self._copy_to_warm(ids[other], rows[other], state[other], last[other])
        elif log is not None:
            self.cold.save_log(np.array([log[0]]), np.array([log[1]]))

    def _note(self, kind: str, *fields) -> None:
        if self.journal is not None:
            self.journal(kind, *fields)

    def redo_step(self, step: int, lr: float) -> None:
        """Replays a logged step: logs it unless the step log already has it (LMDB may be ahead
        of the replay: log entries reach it right after their record)."""
        if step <= self.step and self.optimizer.lr_at(step) == lr:
            return
        self.record_step(step, lr)

    # --- placement ---

    def set_warm_capacity(self, max_rows: int) -> None:
        """Rows the warm tier may keep from now on. Growing takes effect at once; shrinking once
        `place()` has evicted down to it."""
        self._capacity = max_rows
        self._unsettled = True
        if self.policy is not None:
            self.policy.capacity = max_rows
        if self.warm.max_rows is None or max_rows >= len(self.warm):
            self.warm.set_max_rows(max_rows)

    def place(self, max_moves: int | None = None) -> int:
        """Applies one placement plan (evictions, then at most `max_moves` admissions); returns
        the rows moved. Called between requests (the shard's Placer), never inside one."""
        if self.cold is None:
            return 0
        self.tell_policy()  # also when settled: reads of resident rows still reorder them
        if not self._unsettled:
            return 0
        resident = np.sort(self.warm.ids())
        admit, evict = self.policy.plan(resident, max_moves)
        admit, evict = self._checked_plan(resident, admit, evict)
        self._evict(evict)
        if self._capacity is not None and self.warm.max_rows != self._capacity and len(self.warm) <= self._capacity:
            self.warm.set_max_rows(self._capacity)
        room = self.warm.room if self._capacity is None else self._capacity - len(self.warm)
        admit = admit[: max(int(min(room, len(admit))), 0)]
        found, rows, state, last = self.cold.get(admit)
        self.warm.append(admit[found], rows, state, last)
        # Never written, or moved to another shard: not worth an LMDB read every pass. A write
        # puts the rows it stores into DRAM itself (`_copy_to_warm`); a later read records them again.
        self.policy.forget(admit[~found])
        moved = len(evict) + int(np.count_nonzero(found))
        self.warm_counters.promotions += moved - len(evict)
        self._unsettled = moved > 0
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
        """Drops resident `ids` from the warm tier, writing dirty ones back to the cold tier."""
        if not ids.size:
            return
        slots = self.warm.lookup(ids)
        dirty = self.warm.dirty_at(slots)
        if dirty.any():
            self.cold.put(ids[dirty], *self.warm.records_at(slots[dirty]))
            self.warm_counters.writebacks += int(np.count_nonzero(dirty))
        self.warm.remove_slots(slots)
        self.warm_counters.demotions += len(ids)

    def flush(self) -> None:
        """Writes every dirty warm row back to the cold tier (before a shard closes)."""
        if self.cold is None:
            return
        slots = self.warm.dirty_slots()
        if slots.size:
            self.cold.put(self.warm.ids_at(slots), *self.warm.records_at(slots))
            self.warm.mark_clean(slots)
            self.warm_counters.writebacks += len(slots)

    # --- migration ---

    def export_rows(self, ids: np.ndarray) -> RowRecords:
        """Removes the written rows among distinct `ids` (n,) from every tier and returns them
        exactly (row, state, last step), in the order of `ids`. Never-written ids are absent from
        the result and stay nowhere."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"table {self.cfg.name!r}: export_rows takes distinct ids")
        warm = self.warm.pop(ids)
        if self.cold is None:
            return warm
        self.tell_policy()
        self.policy.forget(ids)  # their home is elsewhere now
        cold = self.cold.pop(ids)
        cold = cold.take(~np.isin(cold.ids, warm.ids))  # resident rows: the warm copy is current
        records = RowRecords.concat([warm, cold])
        position = np.argsort(ids)
        order = np.argsort(position[np.searchsorted(ids[position], records.ids)])
        return records.take(order)

    def import_rows(self, records: RowRecords) -> None:
        """Stores `records` (distinct ids) exactly, overwriting what the store holds for them:
        in the cold tier when there is one, and in the warm tier as far as it has room."""
        if self.cold is None:
            self.warm.put(records.ids, records.rows, records.state, records.last)
            return
        self.cold.put(records.ids, records.rows, records.state, records.last)
        self._unsettled = True
        slots = self.warm.lookup(records.ids)
        resident = slots >= 0
        self.warm.write_at(slots[resident], records.rows[resident], records.state[resident],
                           records.last[resident])
        self.warm.mark_clean(slots[resident])  # equal to the cold copy just written
        self._copy_to_warm(*(a[~resident] for a in (records.ids, records.rows, records.state, records.last)))

    def _copy_to_warm(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray) -> None:
        """Appends the records of non-resident `ids` (n,) just written to the cold tier, clean, as
        far as the warm tier has room: what a placement pass would admit next (they were just
        used), without reading them back from LMDB."""
        room = self.warm.room if self._capacity is None else self._capacity - len(self.warm)
        fits = slice(0, max(int(min(room, len(ids))), 0))
        self.warm.append(ids[fits], rows[fits], state[fits], last[fits])

    # --- whole-table views ---

    def records(self, chunk_rows: int = 65536) -> Iterator[RowRecords]:
        """Every written row as it stands, in id order, in chunks of `chunk_rows` rows: the cold
        tier's records with the dirty warm copies in their place (or the warm arena alone without
        a cold tier). What checkpoints stream to disk: a table is never copied whole."""
        if self.cold is None:
            ids = self.warm.ids()
            order = np.argsort(ids)  # slots in id order
            for start in range(0, len(order), chunk_rows):
                slots = order[start:start + chunk_rows]
                yield RowRecords(ids[slots], *self.warm.records_at(slots))
            return
        slots = self.warm.dirty_slots()
        dirty_ids = self.warm.ids_at(slots)
        order = np.argsort(dirty_ids)
        dirty_ids, slots = dirty_ids[order], slots[order]
        for chunk in self.cold.scan(chunk_rows):
            at = np.minimum(np.searchsorted(dirty_ids, chunk.ids), max(len(dirty_ids) - 1, 0))
            newer = (dirty_ids[at] == chunk.ids) if len(dirty_ids) else np.zeros(len(chunk), bool)
            if newer.any():
                chunk.rows[newer], chunk.state[newer], chunk.last[newer] = self.warm.records_at(slots[at[newer]])
            yield chunk

    def digest(self) -> str:
        """sha256 of the config, step log and every written (id, row, state, last step), in id
        order: one sha256 per field over its values in id order, then one over the config, step
        log and those four, so a cold table is hashed in one streaming pass, never held whole."""
        fields = {f: hashlib.sha256() for f in ("ids", "rows", "state", "last")}
        for chunk in self.records():
            for name, field_hash in fields.items():
                field_hash.update(np.ascontiguousarray(getattr(chunk, name)).tobytes())
        h = hashlib.sha256(repr(self.cfg).encode())
        for value in self.optimizer.log_state().values():
            h.update(np.ascontiguousarray(value).tobytes())
        for field_hash in fields.values():
            h.update(field_hash.digest())
        return h.hexdigest()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything a restore needs: written rows as they stand, their optimizer state and last
        step, and the step log (dense Adam's catch-up reads the skipped steps' learning rates)."""
        records = RowRecords.concat([RowRecords.empty(self.cfg.width, self._state_width), *self.records()])
        return {"ids": records.ids, "rows": records.rows, "state": records.state, "last": records.last,
                **self.optimizer.log_state()}

    @classmethod
    def from_state_dict(cls, cfg: TableConfig, state: dict[str, np.ndarray]) -> "TableStore":
        """The all-DRAM store `state_dict` described, for `cfg`; continues bit-identically."""
        store = cls(cfg)
        store.optimizer.load_log_state(state)
        store.warm.append(*(np.asarray(state[k]) for k in ("ids", "rows", "state", "last")))
        store.committed = store.step
        return store

    def load_log_state(self, log: dict[str, np.ndarray]) -> None:
        """Takes the step log of a restored table (`optimizer.log_state()` of the one saved):
        the table is at its last step, complete, as it was; a cold tier stores the log too, so
        a reopened shard recovers it."""
        self.optimizer.load_log_state(log)
        self.committed = self.step
        if self.cold is not None:
            lrs = np.asarray(log["lrs"], dtype=np.float64)
            steps = np.flatnonzero(~np.isnan(lrs))
            self.cold.save_log(steps, lrs[steps])

    def _load_log(self) -> None:
        """The step log stored with the cold tier (a reopened shard continues from it)."""
        steps, lrs = self.cold.load_log()
        if steps.size:
            log = np.full(int(steps.max()) + 1, np.nan)
            log[steps] = lrs
            self.optimizer.load_log_state({"step": np.int64(steps.max()), "lrs": log})
            self.committed = self.step  # a reopened shard's steps are complete

    # --- stats ---

    def tier_usage(self) -> tuple[TierUsage, ...]:
        """Rows, bytes and counters of each tier (optimizer state in DRAM counted apart)."""
        warm_bytes = self.warm.nbytes - self.warm.state_nbytes
        if self.cold is None:
            return (TierUsage(DRAM_TIER, rows=len(self.warm), bytes=warm_bytes, hits=self.hits,
                              misses=self.rows_read - self.hits),)
        w, c = self.warm_counters, self.cold_counters
        return (TierUsage(DRAM_TIER, rows=len(self.warm), bytes=warm_bytes, hits=w.hits, misses=w.misses,
                          promotions=w.promotions, demotions=w.demotions, dirty_rows=self.warm.num_dirty),
                TierUsage(DISK_TIER, rows=len(self.cold), bytes=self.cold.nbytes, hits=c.hits,
                          misses=c.misses, promotions=c.promotions, demotions=c.demotions))
