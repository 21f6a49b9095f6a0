"""One table's rows on one shard: lazily materialised rows and their optimizer state, in tiers.

A row costs memory only once a push has written it; until then a read returns
`init_rows(seed, id)`, the value it would have had, so an untouched 100M-row table costs nothing
and a row starts identical whatever the number of shards. Written rows live in an arena (the DRAM
arena, memory_service/storage/tiers/dram.py, or on a hot shard the device arena, tiers/device.py)
and, on a cold shard with a disk directory, in the disk tier (LMDB, tiers/disk.py) under it:

- The disk tier holds every written row; the arena holds at most its row budget of them, a copy
  that is authoritative while resident and marked dirty once it is newer than the disk copy.
- Reads (row_reader.py) take resident rows from the arena and the rest in one batched LMDB read;
  never-written rows are computed. Writes (row_writer.py) update resident rows in the arena
  (dirty) and write the others to LMDB, copied into the arena only as far as it has room, so the
  DRAM budget holds even when one push writes more rows than fit.
- Which rows the arena keeps is the placement `Policy`'s call, applied between requests by
  `place()` (residency.py): reads and look-ahead announcements (`expect`) are queued for it, and
  its plans move rows between the arena and the disk tier.

A tiered store ends bit-identical to an all-DRAM one given the same requests (row_writer.py says
why; tests/memory_service/storage/test_tiered_store.py checks it). Without a disk tier (the default) the store is the
all-DRAM store it always was: every row in the arena, unbounded, read and updated in place by slot.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from memory_service.config import TableConfig
from memory_service.placement.policy import READ, UNTAGGED, Policy
from memory_service.rows import InitialRows, initial_rows_many
from memory_service.storage.optimizer import optimizer_of
from memory_service.storage.quantized_rows import QuantizedInitialRows
from memory_service.storage.residency import Residency
from memory_service.storage.row_reader import RowReader
from memory_service.storage.row_writer import RowWriter, UpdateBatch
from memory_service.storage.tiers.base import RowRecords
from memory_service.storage.tiers.disk import DiskTier
from memory_service.storage.tiers.dram import DramTier
from memory_service.storage.tiers.shared_arena import FIELD
from memory_service.storage.usage import DISK_TIER, TierCounters, TierUsage


@dataclass(frozen=True)
class Update:
    """One table's push at `step` with learning rate `lr` (checked), computed and checked but not
    stored yet (`TableStore.prepare_update`); `batch` None for a push without rows (it only logs
    the step's learning rate)."""

    step: int
    lr: float
    batch: UpdateBatch | None


@dataclass(frozen=True)
class TableSnapshot:
    """A table's part on one shard as a checkpoint writes it: config, optimizer-state width, the
    number of written rows, the step log (steps (k,) int64 with their learning rates (k,) float64), and
    `records(chunk_rows)`: every written row in id order, in chunks (TableStore.snapshot)."""

    cfg: TableConfig
    state_width: int
    num_rows: int
    steps: np.ndarray
    lrs: np.ndarray
    records: Callable[..., Iterator[RowRecords]]


def state_width_of(cfg: TableConfig) -> int:
    """float32 optimizer-state values per row of the table."""
    return optimizer_of(cfg).state_width(cfg.stored_width)


class TableStore:
    """The rows of one table held by one shard, and their optimizer state.

    `arena`: the upper tier (default: an unbounded DramTier; a hot shard's is a DeviceTier).
    `disk`: the disk tier (LMDB) under it, or None for an all-DRAM store. `policy`: places rows between
    them (needed with `disk`)."""

    def __init__(self, cfg: TableConfig, arena: DramTier | None = None, disk: DiskTier | None = None,
                 policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.optimizer = optimizer_of(cfg)
        # never-written rows' values (a quantized table's: packed, as its stored rows)
        self._init_rows = (QuantizedInitialRows(cfg) if cfg.is_quantized
                           else InitialRows(cfg.seed, cfg.width, cfg.init_scale))
        self._state_width = self.optimizer.state_width(cfg.stored_width)
        self.arena = arena if arena is not None else DramTier(cfg.stored_width, self._state_width)
        self._check_tiers(disk, policy)
        self.disk = disk
        self.arena_counters, self.disk_counters = TierCounters(), TierCounters()
        self.committed = 0  # the last complete step: reads are brought up to it (see `commit`)
        self.reads = 0  # read requests naming the table (counted by the shard)
        self.residency = Residency(self.arena, disk, policy, self.arena_counters)
        self.writer = RowWriter(self.optimizer, self._init_rows, self.arena, disk, self.residency, self._note)
        self.reader = RowReader(self._init_rows, self.arena, disk, self.writer, self.arena_counters,
                                self.disk_counters)
        self.closed = False  # set when the table is dropped or its shard closes
        # Told every change of the table's durable state as it happens (a cold shard's Journal
        # logs them before they reach LMDB): journal(kind, *fields) with kind "rows" (ids, rows,
        # state, last: after-images), "step" (step, lr) or "commit" (step). None: nobody listens.
        self.journal: Callable[..., None] | None = None
        if disk is not None:
            self._load_log()

    def _check_tiers(self, disk: DiskTier | None, policy: Policy | None) -> None:
        """ValueError unless the tiers hold this table's row and state widths, and a disk tier
        comes with a placement policy."""
        cfg = self.cfg
        for tier in (self.arena, disk):
            if tier is not None and (tier.width, tier.state_width) != (cfg.stored_width, self._state_width):
                raise ValueError(f"table {cfg.name!r}: {tier.name} tier holds width {tier.width} + state "
                                 f"{tier.state_width}, the table needs {cfg.stored_width} + {self._state_width}")
        if disk is not None and policy is None:
            raise ValueError(f"table {cfg.name!r}: a store with a disk tier needs a placement policy")

    def close(self, flush: bool = True) -> None:
        """Retires the store, first writing dirty arena rows back when `flush` (a dropped table's
        rows are not worth writing)."""
        if flush:
            self.flush()
        self.closed = True

    @property
    def state_width(self) -> int:
        """float32 optimizer-state values per stored row (0 for a frozen table)."""
        return self._state_width

    @property
    def step(self) -> int:
        """The largest table step pushed so far (0 before any push)."""
        return self.optimizer.step

    @property
    def policy(self) -> Policy | None:
        """The placement policy of a disk-backed store (None: all-DRAM)."""
        return self.residency.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.residency.policy = policy

    @property
    def rows_read(self) -> int:
        """Ids read since start."""
        return self.reader.rows_read

    @property
    def hits(self) -> int:
        """Of the ids read, those found stored (the rest were computed from the seed)."""
        return self.reader.hits

    @property
    def optimizer_rows(self) -> int:
        """Rows the optimizer processed: updated, or caught up on a read."""
        return self.writer.optimizer_rows

    @property
    def num_materialized(self) -> int:
        """Rows written (the disk tier holds every one; the arena copies of some)."""
        return len(self.disk) if self.disk is not None else len(self.arena)

    @property
    def nbytes(self) -> int:
        """Bytes held: the arena (capacity, up to 2x the rows without a budget) and index, plus the
        disk tier's pages."""
        return self.arena.nbytes + (self.disk.nbytes if self.disk is not None else 0)

    @property
    def state_nbytes(self) -> int:
        """Bytes of the arena's optimizer state (part of `nbytes`)."""
        return self.arena.state_nbytes

    # --- reads ---

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (n,) int64 in range -> (n, width) float32, as they stand at the table's
        step: an optimizer that catches up (dense Adam) first brings the written rows among them
        up to date, and keeps the result. Never-written rows are computed, not stored."""
        if self.disk is None:
            return TableStore.read_many({self.cfg.name: (self, ids)})[self.cfg.name]
        out, all_in_arena = self.reader.read_tiered(ids, self.committed)
        self.residency.tell(READ, ids)
        # A read of resident rows alone gives a plan nothing new to admit (and evictions come
        # only with admissions or a smaller capacity): no pass needed for it.
        self.residency.unsettled |= not all_in_arena
        return out

    @staticmethod
    def read_many(requests: dict[str, tuple["TableStore", np.ndarray]]) -> dict[str, np.ndarray]:
        """`store.read(ids)` of each {table: (store, ids)}, the never-written rows of the all-DRAM
        ones computed in one pass (`initial_rows_many`): for the small requests of generation a
        pass costs the same for 1 row as for 16, so one per table made a fetch of 8 tables x 1 row
        cost 1.07 ms of Philox where one pass costs 0.21."""
        out, pending = {}, []
        for name, (store, ids) in requests.items():
            if store.disk is not None:
                out[name] = store.read(ids)
                continue
            out[name], missing = store.reader.read_arena(ids, store.committed)
            if missing.any():
                pending.append((name, store, ids[missing], missing))
        computed = initial_rows_many([(store._init_rows, ids) for _, store, ids, _ in pending], remember=True)
        for (name, store, _, missing), rows in zip(pending, computed):  # their first push reuses them
            if isinstance(store._init_rows, QuantizedInitialRows):
                rows = store._init_rows.pack(rows)
            if missing.all():
                out[name] = rows  # no copy: a wide fetch of new rows would hold them twice
            else:
                out[name][missing] = rows
        return out

    def note_reads(self, ids: np.ndarray, computed: int = 0) -> None:
        """Counts ids (n,) a same-host client read from the shared arena (`computed` of them it
        computed from the seed: never written, so no tier's hits) and tells placement, as `read`
        does."""
        self.reader.rows_read += len(ids)
        self.reader.hits += len(ids) - computed
        if self.disk is not None:
            self.arena_counters.hits += len(ids) - computed
            self.arena_counters.misses += computed
            self.disk_counters.misses += computed
            self.residency.tell(READ, ids)

    def expect(self, ids: np.ndarray, step: int | None = None) -> None:
        """Ids (n,) the fetch of `step` (a held fetch, or an announced one) will read: the
        policy's look-ahead (see Policy.expect)."""
        if self.policy is not None:
            self.residency.tell(UNTAGGED if step is None else step, ids)
            self.residency.unsettled = True

    def tell_policy(self) -> None:
        """Hands the policy the queued reads and announcements, in the order they came."""
        self.residency.tell_policy()

    # --- writes ---

    def check_push(self, ids: np.ndarray, step: int, lr: float | None) -> None:
        """ValueError unless a push of distinct `ids` (n,) at `step` with `lr` can be applied:
        the step log accepts it and, for an optimizer that catches up, no row already took a
        gradient at `step` (the update is not additive: the pushes of one step must be summed)."""
        self.optimizer.checked_lr(step, lr)
        if self.optimizer.catches_up and len(ids):
            done = self.writer.last_of(ids) >= step
            if done.any():
                raise ValueError(f"row id {ids[done.argmax()]} already took a gradient at step "
                                 f"{step}: send each step's gradients of a row in one push")

    def record_step(self, step: int, lr: float | None) -> None:
        """Logs table `step` and its learning rate (a push, possibly empty, arrived for it)."""
        new = self._is_new_step(step)
        self.optimizer.record_step(step, lr)
        if new and self.disk is not None:
            self._note("step", step, self.optimizer.lr_at(step))
            self.disk.save_log(np.array([step]), np.array([self.optimizer.lr_at(step)]))

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
        if (shared := self.arena.shared) is not None:  # what same-host readers check
            shared.set_committed(self.committed)
            if shared.header[FIELD["open_step"]] <= self.committed:
                shared.set_open_step(0)

    def update(self, ids: np.ndarray, grads: np.ndarray, step: int, lr: float | None = None,
               commit: bool = True) -> None:
        """Applies the optimizer at table `step` with learning rate `lr` (None: the configured one)
        to distinct `ids` (n,) with `grads` (n, width); with `commit`, the step is complete (see
        `commit`), else more of its gradients may come. ValueError, and nothing changed, if a row
        or its optimizer state would not be finite (`prepare_update`)."""
        self.write_update(self.prepare_update(ids, grads, step, lr), commit)

    def prepare_update(self, ids: np.ndarray, grads: np.ndarray, step: int, lr: float | None = None) -> Update:
        """The update `update` would make, computed and checked but not stored: ValueError naming
        the first row that it would leave non-finite (row or optimizer state: finite gradients
        can overflow float32 in the optimizer, e.g. a gradient of 1e20 squared into Adam's second
        moment, or a huge learning rate). Changes nothing, so a shard computes every table's
        update of a request first and stores them only once all passed."""
        lr = self.optimizer.checked_lr(step, lr)
        if not len(ids):
            return Update(step, lr, None)
        with np.errstate(over="ignore"):  # an overflow is what the check below finds and refuses
            batch = self.writer.prepare(ids, grads, step, lr)
        if (bad := batch.first_non_finite()) is not None:
            raise ValueError(f"the update of step {step} would make row id {ids[bad]} or its optimizer state "
                             f"non-finite (lr {lr:g}, largest |gradient| {float(np.abs(grads[bad]).max()):g}): "
                             f"refused, nothing applied")
        return Update(step, lr, batch)

    def write_update(self, update: Update, commit: bool = True) -> None:
        """Stores a prepared update (`prepare_update`, with no other change of the table since):
        logs its step and learning rate, writes its rows; with `commit` completes the step."""
        step = update.step
        if update.batch is None:
            self.record_step(step, update.lr)  # an empty push still logs its lr
            if commit:
                self._set_committed(step)
            return
        if commit:
            self._set_committed(step)
        elif step > self.committed and (shared := self.arena.shared) is not None:
            shared.set_open_step(step)  # part of a step: same-host readers leave the table to Fetch
        new = self._is_new_step(step)
        self.optimizer.record_step(step, update.lr)
        if self.disk is None:
            self.writer.write(update.batch, None)
            return
        if new:
            self._note("step", step, update.lr)
        self.writer.write(update.batch, (step, update.lr) if new else None)
        self.residency.unsettled = True  # rows read before they were written can be admitted now

    def _note(self, kind: str, *fields) -> None:
        """Tells the journal, if any, one change of the table's durable state."""
        if self.journal is not None:
            self.journal(kind, *fields)

    def redo_step(self, step: int, lr: float) -> None:
        """Replays a logged step: logs it unless the step log already has it (LMDB may be ahead
        of the replay: log entries reach it right after their record)."""
        if step <= self.step and self.optimizer.lr_at(step) == lr:
            return
        self.record_step(step, lr)

    # --- placement ---

    def set_arena_capacity(self, max_rows: int) -> None:
        """Rows the arena may keep from now on. Growing takes effect at once; shrinking once
        `place()` has evicted down to it."""
        self.residency.set_capacity(max_rows)

    def place(self, max_moves: int | None = None) -> int:
        """Applies one placement plan (evictions, then at most `max_moves` admissions); returns
        the rows moved. Called between requests (the shard's Placer), never inside one."""
        return 0 if self.disk is None else self.residency.place(max_moves)

    def flush(self, ids: np.ndarray | None = None) -> None:
        """Writes every dirty arena row back to the disk tier (before a shard closes), or the
        dirty ones among `ids` (n,): a shard flushes a large dirty set in chunks of those, its
        lock released between them (Shard.flush)."""
        if self.disk is not None:
            self.residency.flush(ids)

    def dirty_ids(self) -> np.ndarray:
        """The ids (n,) of the arena rows newer than their disk copy (none without a disk tier)."""
        if self.disk is None:
            return np.zeros(0, dtype=np.int64)
        return self.arena.ids_at(self.arena.dirty_slots()).copy()

    def snapshot(self, reader=None) -> "TableSnapshot":
        """The table as it stands now, for a checkpoint. With `reader` (an LMDB read transaction
        of the disk tier's environment, DiskEnvironment.reader) and no dirty arena row, the rows
        come from that transaction's snapshot, so they can be read while the shard goes on
        serving; otherwise they are read live (under the shard's lock)."""
        state_width = self._state_width
        steps, lrs = self.optimizer.log.entries()  # copies
        if self.disk is None or reader is None:
            return TableSnapshot(self.cfg, state_width, self.num_materialized, steps, lrs, self.records)
        assert self.arena.num_dirty == 0, "a snapshot from LMDB needs every dirty row flushed first"
        disk = self.disk
        return TableSnapshot(self.cfg, state_width, disk.count(reader), steps, lrs,
                             lambda chunk_rows=65536: disk.scan(chunk_rows, reader))

    # --- migration ---

    def export_rows(self, ids: np.ndarray) -> RowRecords:
        """Removes the written rows among distinct `ids` (n,) from every tier and returns them
        exactly (row, state, last step), in the order of `ids`. Never-written ids are absent from
        the result and stay nowhere."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"table {self.cfg.name!r}: export_rows takes distinct ids")
        from_arena = self.arena.pop(ids)
        if self.disk is None:
            return from_arena
        self.residency.forget(ids)  # their home is elsewhere now
        from_disk = self.disk.pop(ids)
        from_disk = from_disk.take(~np.isin(from_disk.ids, from_arena.ids))  # the arena copy is current
        records = RowRecords.concat([from_arena, from_disk])
        position = np.argsort(ids)
        order = np.argsort(position[np.searchsorted(ids[position], records.ids)])
        return records.take(order)

    def import_rows(self, records: RowRecords) -> None:
        """Stores `records` (distinct ids) exactly, overwriting what the store holds for them:
        in the disk tier when there is one, and in the arena as far as it has room."""
        if self.disk is None:
            self.arena.put(records.ids, records.rows, records.state, records.last)
            return
        self.disk.put(records.ids, records.rows, records.state, records.last)
        self.residency.unsettled = True
        slots = self.arena.lookup(records.ids)
        resident = slots >= 0
        self.arena.write_at(slots[resident], records.rows[resident], records.state[resident],
                            records.last[resident])
        self.arena.mark_clean(slots[resident])  # equal to the disk copy just written
        self.residency.copy_in(*(a[~resident] for a in (records.ids, records.rows, records.state, records.last)))

    # --- whole-table views ---

    def records(self, chunk_rows: int = 65536) -> Iterator[RowRecords]:
        """Every written row as it stands, in id order, in chunks of `chunk_rows` rows: the disk
        tier's records with the dirty arena copies in their place (or the arena alone without a
        disk tier). What checkpoints stream to disk: a table is never copied whole."""
        if self.disk is None:
            ids = self.arena.ids()
            order = np.argsort(ids)  # slots in id order
            for start in range(0, len(order), chunk_rows):
                slots = order[start:start + chunk_rows]
                yield RowRecords(ids[slots], *self.arena.records_at(slots))
            return
        slots = self.arena.dirty_slots()
        dirty_ids = self.arena.ids_at(slots)
        order = np.argsort(dirty_ids)
        dirty_ids, slots = dirty_ids[order], slots[order]
        for chunk in self.disk.scan(chunk_rows):
            at = np.minimum(np.searchsorted(dirty_ids, chunk.ids), max(len(dirty_ids) - 1, 0))
            newer = (dirty_ids[at] == chunk.ids) if len(dirty_ids) else np.zeros(len(chunk), bool)
            if newer.any():
                chunk.rows[newer], chunk.state[newer], chunk.last[newer] = self.arena.records_at(slots[at[newer]])
            yield chunk

    def digest(self) -> str:
        """sha256 of the config, step log and every written (id, row, state, last step), in id
        order: one sha256 per field over its values in id order, then one over the config, step
        log and those four, so a disk-backed table is hashed in one streaming pass, never held whole."""
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
        records = RowRecords.concat([RowRecords.empty(self.cfg.stored_width, self._state_width), *self.records()])
        return {"ids": records.ids, "rows": records.rows, "state": records.state, "last": records.last,
                **self.optimizer.log_state()}

    @classmethod
    def from_state_dict(cls, cfg: TableConfig, state: dict[str, np.ndarray]) -> "TableStore":
        """The all-DRAM store `state_dict` described, for `cfg`; continues bit-identically."""
        store = cls(cfg)
        store.optimizer.load_log_state(state)
        store.arena.append(*(np.asarray(state[k]) for k in ("ids", "rows", "state", "last")))
        store.committed = store.step
        return store

    def load_log_state(self, log: dict[str, np.ndarray]) -> None:
        """Takes the step log of a restored table (`optimizer.log_state()` of the one saved):
        the table is at its last step, complete, as it was; a disk tier stores the log too, so a
        reopened shard recovers it."""
        self.optimizer.load_log_state(log)
        self.committed = self.step
        if self.disk is not None:
            self.disk.save_log(*self.optimizer.log.entries())

    def _load_log(self) -> None:
        """The step log stored with the disk tier (a reopened shard continues from it)."""
        steps, lrs = self.disk.load_log()
        if steps.size:
            self.optimizer.load_log_state({"step": np.int64(steps.max()), "steps": steps, "lrs": lrs})
            self.committed = self.step  # a reopened shard's steps are complete

    # --- stats ---

    def row_bytes(self) -> tuple[int, int]:
        """(bytes per row in the arena: row, state, id, last step, dirty flag (index not counted);
        bytes per LMDB record: row, state, last step (0 without a disk tier))."""
        row = 4 * (self.arena.width + self.arena.state_width)
        return DramTier.row_nbytes(self.arena.width, self.arena.state_width), (row + 8 if self.disk is not None else 0)

    def tier_usage(self) -> tuple[TierUsage, ...]:
        """Rows, bytes and counters of each tier (optimizer state in DRAM counted apart)."""
        arena_bytes = self.arena.nbytes - self.arena.state_nbytes
        if self.disk is None:
            return (TierUsage(self.arena.name, rows=len(self.arena), bytes=arena_bytes, hits=self.hits,
                              misses=self.rows_read - self.hits),)
        a, d = self.arena_counters, self.disk_counters
        return (TierUsage(self.arena.name, rows=len(self.arena), bytes=arena_bytes, hits=a.hits, misses=a.misses,
                          promotions=a.promotions, demotions=a.demotions, dirty_rows=self.arena.num_dirty),
                TierUsage(DISK_TIER, rows=len(self.disk), bytes=self.disk.nbytes, hits=d.hits,
                          misses=d.misses, promotions=d.promotions, demotions=d.demotions))
