"""A shard: its part of every table, behind the checks of the service's public edge.

`Shard` is what a shard actor's gRPC servicer calls. It validates a whole request (every table,
every id, every gradient) before touching any state, so a rejected request, even one naming
several tables, changes nothing; it sums duplicate ids' gradients before the optimizer sees them
(the update is non-linear, as torch's `grad.coalesce()` before SparseAdam); and one lock
serialises requests because gRPC serves them from a thread pool.

Two things make training through the service exact. A fetch may name the table step it must see
(`min_step`): it waits, without holding the lock, until pushes brought every table there, so a
trainer can send the next step's fetch before this step's push. And K data-parallel workers push
their parts of one step separately (`contributors=K`): the shard sums the K parts and applies the
optimizer once, as one worker with the whole batch would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from memory_service.ops.collisions import CollisionSketch, NgramBatch
from memory_service.config import StorageConfig, TableConfig
from memory_service.errors import (FailedPrecondition, InvalidArgument, StepNotReached, TableExists,
                                   TableNotFound)
from memory_service.shard.homes import Homes
from memory_service.shard.move_gate import MoveGate
from memory_service.durability.journal import Journal
from memory_service.placement.policy import READ, UNTAGGED, make_policy
from memory_service.shard.placer import Placer
from memory_service.sharding import shard_of
from memory_service.storage.store import TableStore, state_width_of
from memory_service.storage.tiers.base import RowRecords
from memory_service.storage.tiers.disk import DiskEnvironment, record_dtype
from memory_service.storage.tiers.dram import DramTier
from memory_service.ops.reports import ShardCounters, TableUsage
from memory_service.tables import TableInfo, TablePush
from memory_service.durability.wal import WriteAheadLog


# 1/HEADROOM of each table's DRAM share holds no rows: it is left to the placement policy's
# bookkeeping (plain LRU keeps 8 bytes per resident row, 1% of a share of 64-wide Adam rows; a
# frequency sketch needs more) and to what requests leave allocated between them (measured in
# tests/test_cold_memory.py: at rest, 2.6 MiB beyond a 240 MiB warm tier, LRU included).
HEADROOM = 16

T = TypeVar("T")


@dataclass
class _Parts:
    """The parts of one (table, step) pushed so far by data-parallel workers."""

    contributors: int
    lr: float | None
    clients: set[str] = dataclasses.field(default_factory=set)
    ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    grads: list[np.ndarray] = dataclasses.field(default_factory=list)


@dataclass
class _Accesses:
    """One table's reads and look-aheads since placement last looked, as (tag, ids) events in the
    order they came (a read fulfils the look-ahead announced before it, not one announced after),
    bounded to MAX_EVENTS (the oldest dropped first)."""

    MAX_EVENTS = 512
    events: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)

    def record(self, ids: np.ndarray) -> None:
        self._add(READ, ids)  # distinct: the client deduplicates each request

    def expect(self, ids: np.ndarray, step: int | None) -> None:
        self._add(UNTAGGED if step is None else step, ids)

    def _add(self, tag: int, ids: np.ndarray) -> None:
        self.events.append((tag, ids.copy()))
        del self.events[:-self.MAX_EVENTS]


def _config_diff(a: object, b: object, prefix: str = "") -> list[str]:
    """'field: a != b' for each differing field of two config dataclasses, nested ones flattened."""
    diffs = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            diffs += _config_diff(x, y, f"{prefix}{f.name}.")
        elif x != y:
            diffs.append(f"{prefix}{f.name} {x!r} != {y!r}")
    return diffs


def _sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids (n,), grads (n, w) -> distinct ids (m,) sorted, summed grads (m, w), in id order."""
    if not len(ids):
        return ids, grads
    order = np.argsort(ids, kind="stable")
    ids, grads = ids[order], grads[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # (m,) first of each run
    if len(starts) == len(ids):
        return ids, grads
    return ids[starts], np.add.reduceat(grads, starts, axis=0)


class Shard:
    """Shard `shard_id` of `num_shards`: rows r with r % num_shards == shard_id of every table.

    With `storage.path` set it is a cold shard with disk: every table's written rows live in an
    LMDB environment in that directory (reopening the directory recovers them), DRAM keeps at
    most `storage.dram_budget_bytes` of them, and a background `Placer` moves rows between the two
    following the placement policy. Call `close()` to write dirty rows back and close the files.
    Every change is in its write-ahead log before it is acknowledged, so a shard reopened after a
    crash recovers every acknowledged change (memory_service/durability/journal.py, recovery.py); an all-DRAM
    shard loses everything with its process. A push or commit with a `request_seq` is applied once
    however often it is re-sent (the journal remembers it).
    A "hot" `role` shard is home of the hot rows id % num_shards instead (memory_service/shard/homes.py).
    `device` (a torch device name, for a shard without `storage.path`) keeps every table's rows and
    optimizer state in a DeviceTier arena there, so a hot shard on a GPU gathers the rows it serves in
    GPU memory; None keeps them in host DRAM (numpy)."""

    def __init__(self, shard_id: int, num_shards: int, storage: StorageConfig | None = None,
                 role: str = "cold", track_accesses: bool = False, device: str | None = None) -> None:
        if not 0 <= shard_id < num_shards:
            raise InvalidArgument(f"shard id {shard_id} must be in [0, {num_shards})")
        if device is not None and storage is not None and storage.path is not None:
            raise InvalidArgument(f"device {device!r} is for all-DRAM shards; a shard with storage.path "
                                  f"{storage.path!r} keeps its rows in host DRAM over LMDB")
        self.shard_id, self.num_shards, self.device = shard_id, num_shards, device
        self.homes = Homes(role)  # a hot shard is shard `shard_id` of the `num_shards` hot ones
        self.track_accesses = track_accesses  # keep reads for placement (hot shards, tiers) to drain
        self._accesses: dict[str, _Accesses] = {}
        self.counters = ShardCounters()
        self._tables: dict[str, TableStore] = {}
        self._parts: dict[tuple[str, int], _Parts] = {}  # (table, step) -> parts held so far
        self._commits: dict[tuple[str, int], set[str]] = {}  # (table, step) -> clients that committed it
        self.storage = storage if storage is not None else StorageConfig()
        self._collisions: dict[str, CollisionSketch] = {}  # tables with collision stats on
        self._lock = threading.Lock()
        self._stepped = threading.Condition(self._lock)  # notified when a table's step advances
        self._cold: DiskEnvironment | None = None
        self.placer: Placer | None = None
        self.moves = MoveGate()  # a hot shard's migrator asks it before each round; checkpoints pause it
        self.journal = Journal()  # requests applied once; a cold shard's logs its changes too
        self._closed = False
        if self.storage.path is not None:
            self._open_cold()

    def _open_cold(self) -> None:
        """Opens the LMDB directory, reopens the tables it holds and starts placement."""
        make_policy(self.storage.policy, 0)  # an unknown policy name fails here, not in a thread
        self._cold = DiskEnvironment(self.storage.path, self.storage.map_bytes)
        try:
            self._cold.check_shard(self.shard_id, self.num_shards)
        except ValueError as err:
            self._cold.close()
            raise InvalidArgument(str(err)) from None
        for meta in self._cold.tables().values():
            cfg = TableConfig.from_dict(meta["config"])
            self._tables[cfg.name] = self._new_store(cfg)
        self._split_budget()
        if self.storage.wal:
            from memory_service.shard import recovery

            wal = WriteAheadLog(os.path.join(self.storage.path, "wal"), self.storage.wal_fsync)
            self.journal = Journal(wal, self._cold, self.storage.flush_interval_s, self.storage.flush_wal_bytes)
            recovery.recover(self)
            self._checkpoint()
            for name, store in self._tables.items():
                store.journal = self.journal.for_table(name)
        self.placer = Placer(self._lock, self._tables.values, self.storage.placement_interval_s,
                             self.storage.max_moves, housekeeping=self._flush_if_due)
        self.placer.start()

    def flush(self) -> None:
        """Writes every dirty row to LMDB and starts a new write-ahead log (a checkpoint), so a
        restart replays nothing. A cold shard does this by itself when its log grows past
        `storage.flush_wal_bytes` or `storage.flush_interval_s` passes, and on close."""
        with self._lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        if not self.journal.durable:
            return
        from memory_service.shard import recovery

        for store in self._tables.values():
            store.flush()
        self.journal.checkpoint(recovery.snapshot(self))

    def _flush_if_due(self) -> None:
        """The placer's housekeeping (under the lock): a checkpoint when the journal says so."""
        if self.journal.due():
            self._checkpoint()

    def _new_store(self, cfg: TableConfig) -> TableStore:
        if self._cold is None and self.device is not None:
            from memory_service.storage.tiers.device import DeviceTier  # torch only where a shard asks for a device

            return TableStore(cfg, warm=DeviceTier(cfg.width, state_width_of(cfg), device=self.device))
        if self._cold is None:
            return TableStore(cfg)
        state_width = state_width_of(cfg)
        rows_here = -(-cfg.num_rows // self.num_shards)
        self._cold.reserve(min(rows_here * record_dtype(cfg.width, state_width).itemsize * 3 // 2,
                               self.storage.map_bytes))
        cold = self._cold.open_table(cfg.name, {"config": cfg.to_dict()}, cfg.width, state_width)
        warm = DramTier(cfg.width, state_width, max_rows=0)  # _split_budget sizes it
        return TableStore(cfg, warm=warm, cold=cold, policy=make_policy(self.storage.policy, 0))

    def _split_budget(self) -> None:
        """Gives each table an equal share of the DRAM budget, as rows of its own size, less the
        headroom (see HEADROOM)."""
        if self._cold is None or not self._tables:
            return
        share = self.storage.dram_budget_bytes // len(self._tables)
        share -= share // HEADROOM
        for store in self._tables.values():
            store.set_warm_capacity(DramTier.rows_within(share, store.cfg.width, store.warm.state_width))

    def close(self) -> None:
        """Stops placement, writes dirty rows back, empties the write-ahead log and closes the
        LMDB files (a cold shard; an all-DRAM shard has nothing to close). The shard serves nothing
        afterwards; closing again does nothing."""
        if self.placer is not None:
            self.placer.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._cold is not None and self.journal.failed is None:
                self._checkpoint()  # the log is empty afterwards: a reopen replays nothing
            for store in self._tables.values():
                store.close()
            self.journal.close()
            if self._cold is not None:
                self._cold.close()
                self._cold = None

    def create_table(self, cfg: TableConfig) -> TableInfo:
        """Creates the table; re-creating with the identical config is a no-op."""
        with self._lock:
            store = self._tables.get(cfg.name)
            if store is None:
                store = self._tables[cfg.name] = self._new_store(cfg)
                store.journal = self.journal.for_table(cfg.name)
                self._split_budget()
                if cfg.collision_sample_rate > 0:
                    self._collisions[cfg.name] = CollisionSketch(cfg.collision_sample_rate)
            elif store.cfg != cfg:
                diff = ", ".join(_config_diff(store.cfg, cfg))
                raise TableExists(f"table {cfg.name!r} exists with a different config: {diff}")
            return self._info(store)

    def describe_table(self, name: str) -> TableInfo:
        with self._lock:
            return self._info(self._store(name))

    def drop_table(self, name: str) -> None:
        with self._lock:
            self._store(name).close(flush=False)
            del self._tables[name]
            if self._cold is not None:
                self._cold.drop_table(name)
                self._split_budget()
            self._collisions.pop(name, None)
            self.homes.drop(name)
            self._accesses.pop(name, None)
            self._parts = {key: parts for key, parts in self._parts.items() if key[0] != name}
            self._commits = {key: c for key, c in self._commits.items() if key[0] != name}
            self._checkpoint()  # the log's records of the dropped table are never replayed
            self._stepped.notify_all()  # fetches waiting on it answer NOT_FOUND

    def list_tables(self) -> list[str]:
        with self._lock:
            return sorted(self._tables)

    def fetch(self, requests: dict[str, np.ndarray], min_step: int = 0,
              timeout: float | None = None) -> dict[str, np.ndarray]:
        """Rows of each table's ids (n,) -> (n, width) float32, in the ids' order, repeats kept,
        read once every table's step is >= `min_step` (StepNotReached after `timeout` seconds)."""
        with self._lock:
            checked = {name: self._checked_ids(name, ids) for name, ids in requests.items()}
            if min_step > 0:
                for name, ids in checked.items():  # a look-ahead read: placement may act on it now
                    if self._tables[name].committed < min_step:
                        self._expect(name, ids, min_step)
                reached = lambda: all(name not in self._tables or self._tables[name].committed >= min_step
                                      for name in checked)
                if not self._stepped.wait_for(reached, timeout):
                    steps = {name: self._store(name).committed for name in checked}
                    raise StepNotReached(f"fetch waited {timeout:.1f} s for step {min_step}; tables are at {steps}")
                for name in checked:
                    self._store(name)  # dropped while this fetch waited
            for name, ids in checked.items():
                self.homes.check(name, ids)  # after any wait: a row may have moved meanwhile
            self.counters.fetch_requests += 1
            self.counters.fetch_rows += sum(len(ids) for ids in checked.values())
            if self.track_accesses:
                for name, ids in checked.items():
                    self._accesses.setdefault(name, _Accesses()).record(ids)
            with self.journal.change():  # dense Adam catches rows up as it reads them
                return TableStore.read_many({name: (self._tables[name], ids) for name, ids in checked.items()})

    def announce(self, requests: dict[str, np.ndarray], step: int | None = None) -> None:
        """Ids (n,) per table that a fetch of a later step will read: placement's look-ahead
        (DRAM/LMDB inside a cold shard, hot/cold migration). `step`: the min_step that fetch will
        carry (a held fetch is tagged with its own), so placement can merge the parts of one step
        that other shards got and order the steps; None: read after those announced before. Only
        a hint: ids of rows that moved away since the client routed them inform placement all the
        same and change nothing."""
        if step is not None and step < 0:
            raise ValueError(f"announced step {step} must be >= 0")
        with self._lock:
            checked = {name: self._checked_ids(name, ids) for name, ids in requests.items()}
            for name, ids in checked.items():
                self._expect(name, ids, step)

    def _expect(self, name: str, ids: np.ndarray, step: int | None) -> None:
        """Checked ids (n,) of table `name` that the fetch of `step` will take: the look-ahead of
        the DRAM/LMDB placement of a cold shard and, on shards that keep reads, of the hot/cold
        migration."""
        self._tables[name].expect(ids, step)
        if self.track_accesses:
            self._accesses.setdefault(name, _Accesses()).expect(ids, step)

    def push(self, client_id: str, pushes: dict[str, TablePush], contributors: int = 1,
             commit: bool = True, request_seq: int = 0) -> int:
        """Applies each table's gradients at its step; returns the number of distinct rows updated.

        With `commit` the step is complete at once: fetches waiting for it are answered. Without,
        the sender commits it (`commit`) after all its requests of the step arrived — several
        requests per shard when rows moved under it — and only then do reads see the step.
        With `contributors` K > 1 this is one worker's part of the step: parts are held and their
        sum applied once, when K distinct `client_id`s sent (with `commit`) or committed (without)
        theirs. Otherwise `client_id` names the sender for logs and metrics.
        A request re-sent with the `request_seq` (> 0) of one already applied is answered with its
        first answer and not applied again.
        """
        if not 1 <= contributors <= 65536:
            raise InvalidArgument(f"contributors {contributors} must be in [1, 65536]")
        with self._lock:
            if (done := self.journal.applied(client_id, request_seq)) is not None:
                return done
            checked = {name: self._checked_push(name, p) for name, p in pushes.items()}
            with self.journal.change(client_id, request_seq) as change:
                if contributors > 1:
                    checked = self._add_parts(client_id, checked, pushes, contributors, finish=commit)
                self.counters.push_requests += 1
                self.counters.push_rows += sum(len(p.ids) for p in pushes.values())  # repeats counted
                num_updated = 0
                for name, (step, ids, grads) in checked.items():
                    store = self._tables[name]
                    if len(ids):
                        store.update(ids, grads, step, pushes[name].lr, commit)  # logs the step, then updates
                        num_updated += len(ids)
                    else:
                        store.record_step(step, pushes[name].lr)  # an empty push still logs its lr
                    if commit:
                        store.commit(step, pushes[name].lr)
                change.result = num_updated
            self._stepped.notify_all()
            return num_updated

    def commit(self, client_id: str, steps: dict[str, tuple[int, float | None]], contributors: int = 1,
               request_seq: int = 0) -> int:
        """Step `step` of each table {name: (step, lr)} is complete for `client_id`: every one of
        its requests of the step arrived. With K > 1 contributors, the K-th distinct client's commit
        applies the sum of the parts held. Returns rows updated. A re-sent `request_seq` is
        answered as the first time, as in `push`."""
        if not 1 <= contributors <= 65536:
            raise InvalidArgument(f"contributors {contributors} must be in [1, 65536]")
        with self._lock:
            if (done := self.journal.applied(client_id, request_seq)) is not None:
                return done
            for name, (step, lr) in steps.items():
                if not isinstance(step, (int, np.integer)) or step < 1:
                    raise InvalidArgument(f"table {name!r}: commit step {step} must be an integer >= 1")
                try:
                    self._store(name).optimizer.checked_lr(step, lr)  # before any change
                except ValueError as err:
                    raise InvalidArgument(f"table {name!r}: {err}") from None
                if contributors > 1 and client_id in self._commits.get((name, step), ()):
                    raise InvalidArgument(f"table {name!r} step {step}: client {client_id!r} already committed")
            updated = 0
            with self.journal.change(client_id, request_seq) as change:
                for name, (step, lr) in steps.items():
                    store = self._tables[name]
                    if contributors > 1:
                        committed = self._commits.setdefault((name, step), set())
                        committed.add(client_id)
                        self.journal.note(name, "vote", step, client_id)
                        if len(committed) < contributors:
                            continue
                        del self._commits[(name, step)]
                        parts = self._parts.pop((name, step), None)
                        self.journal.note(name, "parts_done", step)
                        if parts is not None and parts.ids:
                            ids, grads = _sum_duplicates(np.concatenate(parts.ids), np.concatenate(parts.grads))
                            store.update(ids, grads, step, lr, commit=False)
                            updated += len(ids)
                    store.commit(step, lr)
                change.result = updated
            self._stepped.notify_all()
            return updated

    def _add_parts(self, client_id: str, checked: dict, pushes: dict[str, TablePush], contributors: int,
                   finish: bool = True) -> dict:
        """Holds each table's part; returns {table: (step, ids, summed grads)} of the steps whose
        K-th part this is (with `finish`; without, a client may send several requests of its
        part, and its commit counts instead). Checks every table before holding any part."""
        for name, (step, _, _) in checked.items():
            parts = self._parts.get((name, step))
            if parts is None:
                continue
            if parts.contributors != contributors:
                raise InvalidArgument(f"table {name!r} step {step}: {contributors} contributors, but "
                                      f"earlier parts said {parts.contributors}")
            if parts.lr != pushes[name].lr:
                raise InvalidArgument(f"table {name!r} step {step}: lr {pushes[name].lr} differs from "
                                      f"the earlier parts' {parts.lr}")
            if finish and client_id in parts.clients:
                raise InvalidArgument(f"table {name!r} step {step}: client {client_id!r} already sent its part")
        complete = {}
        for name, (step, ids, grads) in checked.items():
            parts = self._parts.setdefault((name, step), _Parts(contributors, pushes[name].lr))
            parts.clients.add(client_id)
            parts.ids.append(ids)
            parts.grads.append(grads)
            self.journal.note(name, "part", step, client_id, contributors, pushes[name].lr, ids, grads)
            if finish and len(parts.clients) == contributors:
                del self._parts[(name, step)]
                self.journal.note(name, "parts_done", step)
                ids, grads = _sum_duplicates(np.concatenate(parts.ids), np.concatenate(parts.grads))
                try:
                    self._tables[name].check_push(ids, step, parts.lr)
                except ValueError as err:
                    raise InvalidArgument(f"table {name!r}: {err}") from None
                complete[name] = (step, ids, grads)
        return complete

    # -- hot and cold shards ----------------------------------------------------------------------
    def export_rows(self, name: str, ids: np.ndarray, version: int, client_id: str = "",
                    request_seq: int = 0) -> RowRecords:
        """Hands distinct rows `ids` (n,) over for a move: removed here with their optimizer state,
        refused (RowsMoved) from now on. Only rows ever written come back. A re-sent
        (client_id, request_seq) gets the same rows again (its first answer was lost)."""
        with self._lock:
            if (done := self.journal.exported(client_id, request_seq)) is not None:
                return done
            ids = self._checked_ids(name, ids)
            if len(np.unique(ids)) != len(ids):
                raise InvalidArgument(f"table {name!r}: export ids must be distinct")
            self.homes.check(name, ids)
            with self.journal.change(client_id, request_seq) as change:
                records = self._tables[name].export_rows(ids)
                self.journal.note(name, "export", ids, version, records.ids, records.rows, records.state,
                                  records.last)
                self.homes.leave(name, ids, version)
                change.result = len(records)
            self.journal.remember_export(client_id, request_seq, name, records)
            return records

    def import_rows(self, name: str, records: RowRecords, version: int, ids: np.ndarray | None = None) -> None:
        """Takes rows moved here: `ids` (n,) all of them, `records` those ever written (the
        others are computed from the seed wherever they are), exported by their previous home."""
        with self._lock:
            ids = self._checked_ids(name, records.ids if ids is None else ids)
            self._check_records(name, records, ids)
            with self.journal.change():
                self.journal.note(name, "import", ids, records.ids, records.rows, records.state, records.last, version)
                self._tables[name].import_rows(records)
                self.homes.arrive(name, ids, version)

    # -- checkpoints (memory_service/durability/checkpoint.py) ------------------------------------------------
    def checkpoint_tables(self, step: int, names: list[str], timeout: float,
                          write: Callable[[TableStore], T]) -> dict[str, T]:
        """{table: write(its store)} for `names` (all tables when empty), called under the shard's
        lock once every one of them is at table step `step`, complete: a checkpoint is consistent
        at one step. Waits up to `timeout` seconds for the step's commits (data-parallel workers'
        parts may still be arriving); FailedPrecondition if a table is at another step then."""
        with self._lock:
            names = sorted(self._tables) if not names else list(names)
            for name in names:
                self._store(name)
            self._stepped.wait_for(lambda: all(name not in self._tables or self._tables[name].committed >= step
                                               for name in names), timeout)
            for name in names:
                store = self._store(name)  # dropped while we waited: NOT_FOUND
                if store.committed != step or store.step != step:
                    raise FailedPrecondition(
                        f"table {name!r} on {self.homes.role} shard {self.shard_id} is at step {store.step} "
                        f"(complete: {store.committed}), not at the checkpoint's step {step}")
            return {name: write(self._tables[name]) for name in names}

    def restore_table(self, cfg: TableConfig, log: dict[str, np.ndarray], chunks: Iterable[RowRecords]) -> int:
        """Creates table `cfg` as a checkpoint saved it: its step log (`optimizer.log_state()`),
        then its rows with their optimizer state from `chunks`, each one stored exactly (in the
        tiers of a cold shard with disk). Returns the rows taken. FailedPrecondition if the table
        exists here; on any error the table is dropped again, so a failed restore leaves nothing."""
        with self._lock:
            if cfg.name in self._tables:
                raise FailedPrecondition(f"table {cfg.name!r} exists on {self.homes.role} shard {self.shard_id}: "
                                         f"restore onto shards that do not hold the checkpoint's tables")
            store = self._tables[cfg.name] = self._new_store(cfg)
            self._split_budget()
            if cfg.collision_sample_rate > 0:
                self._collisions[cfg.name] = CollisionSketch(cfg.collision_sample_rate)
            try:
                store.load_log_state(log)
                num_rows = 0
                for chunk in chunks:  # straight to LMDB (no journal yet): the checkpoint below covers them
                    self._checked_ids(cfg.name, chunk.ids)
                    store.import_rows(chunk)
                    num_rows += len(chunk)
                store.journal = self.journal.for_table(cfg.name)  # later changes are logged
                self._checkpoint()  # a durable shard restarts from the restored state, replaying nothing
                self._stepped.notify_all()
                return num_rows
            except BaseException as err:
                failed = err
        self.drop_table(cfg.name)
        raise failed

    def table_state(self, name: str) -> dict[str, np.ndarray]:
        """The table's written rows on this shard with their optimizer state and last step, and its
        step log (TableStore.state_dict): what a checkpoint or an exactness check reads."""
        with self._lock:
            return self._store(name).state_dict()

    def state_width(self, name: str) -> int:
        """Optimizer-state values per row of table `name`."""
        with self._lock:
            store = self._store(name)
            return store.optimizer.state_width(store.cfg.width)

    def hot_map(self, name: str) -> tuple[int, np.ndarray]:
        """(version, sorted ids) of the rows of `name` this hot shard is home of."""
        with self._lock:
            self._store(name)
            return self.homes.version, self.homes.ids(name)

    def drain_accesses(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """{table: its access events since the last call, in order: (READ, the distinct ids of a
        fetch served) or (step or UNTAGGED, the ids of a look-ahead)}; bounded (the oldest events
        are dropped first)."""
        with self._lock:
            drained, self._accesses = self._accesses, {}
        return {name: a.events for name, a in drained.items()}

    def record_ngrams(self, samples: dict[str, tuple[np.ndarray, NgramBatch]]) -> None:
        """Adds the N-grams behind a fetch that succeeded: {table: (its distinct ids (n,), their
        NgramBatch)}, for the tables' collision stats. Tables with collision stats off (or dropped
        since) are skipped."""
        for name, (ids, batch) in samples.items():
            sketch = self._collisions.get(name)
            if sketch is not None:
                sketch.record(np.asarray(ids, dtype=np.int64), batch)

    def usage(self) -> tuple[TableUsage, ...]:
        """Rows, bytes, reads and collision counts of every table, sorted by name. Collision
        counts are read after the shard's lock is released (each sketch has its own)."""
        with self._lock:
            tables = [(self._usage(self._tables[name]), self._collisions.get(name))
                      for name in sorted(self._tables)]
        return tuple(usage if sketch is None else dataclasses.replace(usage, collisions=sketch.counts())
                     for usage, sketch in tables)

    @staticmethod
    def _usage(store: TableStore) -> TableUsage:
        cfg, state = store.cfg, store.state_nbytes
        return TableUsage(name=cfg.name, num_rows=cfg.num_rows, width=cfg.width, step=store.step,
                          rows_read=store.rows_read, optimizer_rows=store.optimizer_rows,
                          optimizer_state_bytes=state, tiers=store.tier_usage())

    def owns(self, ids: np.ndarray) -> bool:
        """Whether every id (n,) lives on this shard."""
        return bool(np.all(shard_of(ids, self.num_shards) == self.shard_id))

    def digest(self) -> str:
        """sha256 over every table's digest, in name order: equal iff no state changed."""
        with self._lock:
            h = hashlib.sha256()
            for name in sorted(self._tables):
                h.update(self._tables[name].digest().encode())
            return h.hexdigest()

    def _info(self, store: TableStore) -> TableInfo:
        return TableInfo(store.cfg, store.step, store.num_materialized, store.nbytes,
                         store.optimizer_rows)

    def _store(self, name: str) -> TableStore:
        if name not in self._tables:
            raise TableNotFound(f"table {name!r} not found on shard {self.shard_id}")
        return self._tables[name]

    def _checked_ids(self, name: str, ids: np.ndarray) -> np.ndarray:
        """ids of table `name` as (n,) int64, or InvalidArgument naming the first bad id."""
        num_rows = self._store(name).cfg.num_rows
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidArgument(f"table {name!r}: row ids must be a 1-D integer array, "
                                  f"got {ids.dtype} of shape {ids.shape}")
        bad = (ids < 0) | (ids >= num_rows)  # before the int64 cast: a uint64 id may not fit
        if bad.any():
            raise InvalidArgument(f"table {name!r}: row id {ids[bad.argmax()]} out of range "
                                  f"[0, {num_rows})")
        ids = ids.astype(np.int64, copy=False)
        shards = shard_of(ids, self.num_shards)
        if (foreign := shards != self.shard_id).any():
            i = foreign.argmax()
            raise InvalidArgument(f"table {name!r}: row id {ids[i]} belongs to shard {shards[i]} "
                                  f"of {self.num_shards}, not to shard {self.shard_id}")
        return ids

    def _check_records(self, name: str, records: RowRecords, ids: np.ndarray) -> None:
        """InvalidArgument unless `records` can be stored as moved rows `ids` (n,): distinct ids of
        this shard, the records' among them, finite values, steps >= 0."""
        record_ids = self._checked_ids(name, records.ids)
        if len(np.unique(ids)) != len(ids) or len(np.unique(record_ids)) != len(record_ids):
            raise InvalidArgument(f"table {name!r}: imported ids must be distinct")
        if not np.isin(record_ids, ids).all():
            raise InvalidArgument(f"table {name!r}: imported records name ids outside the moved ids")
        if not (np.isfinite(records.rows).all() and np.isfinite(records.state).all()):
            raise InvalidArgument(f"table {name!r}: imported rows and optimizer state must be finite")
        if len(records.last) and records.last.min() < 0:
            raise InvalidArgument(f"table {name!r}: imported last step {records.last.min()} must be >= 0")

    def _checked_push(self, name: str, push: TablePush) -> tuple[int, np.ndarray, np.ndarray]:
        """(step, distinct ids (m,) int64, their summed grads (m, width) f32) of a valid push,
        else InvalidArgument (or RowsMoved)."""
        ids = self._checked_ids(name, push.ids)
        self.homes.check(name, ids)
        width = self._tables[name].cfg.width
        if not isinstance(push.step, (int, np.integer)) or push.step < 1:
            raise InvalidArgument(f"table {name!r}: step {push.step} must be an integer >= 1")
        grads = np.asarray(push.grads)
        if grads.ndim != 2 or not np.issubdtype(grads.dtype, np.floating):
            raise InvalidArgument(f"table {name!r}: gradients must be a 2-D float array "
                                  f"(n, width), got {grads.dtype} of shape {grads.shape}")
        if grads.shape[1] != width:
            raise InvalidArgument(f"table {name!r}: gradient width {grads.shape[1]} != table "
                                  f"width {width}")
        if grads.shape[0] != len(ids):
            raise InvalidArgument(f"table {name!r}: {grads.shape[0]} gradient rows != "
                                  f"{len(ids)} row ids")
        grads = grads.astype(np.float32, copy=False)
        if not (finite := np.isfinite(grads).all(axis=1)).all():
            i = finite.argmin()
            raise InvalidArgument(f"table {name!r}: gradient of row id {ids[i]} is not finite")
        ids, grads = _sum_duplicates(ids, grads)
        try:
            self._tables[name].check_push(ids, int(push.step), push.lr)
        except ValueError as err:
            raise InvalidArgument(f"table {name!r}: {err}") from None
        return int(push.step), ids, grads
