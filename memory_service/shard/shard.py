"""A shard: its part of every table, behind the checks of the service's public edge.

`Shard` is what a shard actor's gRPC servicer calls. It checks a whole request before touching any
state (request_checks.py), so a rejected request changes nothing, and one lock serialises requests
because gRPC serves them from a thread pool. Two things make training through the service exact:
a fetch may name the table step it must see (`min_step`) and waits, without holding the lock,
until pushes brought every table there, so a trainer can send the next step's fetch before this
step's push; and K data-parallel workers' parts of one step are summed and applied once
(step_parts.py), as one worker with the whole batch would.

Longer than our ~400-line mark on purpose: `Shard` is the one holder of the request lock, and each
of its public methods takes it; the work under the lock lives in table_stores.py, step_parts.py,
request_checks.py and recovery.py, so what stays here is the order of steps each request takes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import TypeVar

import numpy as np

from memory_service.config import StorageConfig, TableConfig
from memory_service.durability.journal import Journal
from memory_service.durability.wal import WriteAheadLog
from memory_service.errors import Cancelled, FailedPrecondition, InvalidArgument, StepNotReached, TableExists
from memory_service.native import compiled
from memory_service.ops.collisions import CollisionSketch, NgramBatch
from memory_service.ops.reports import ShardCounters, TableUsage
from memory_service.shard import request_checks as checks
from memory_service.shard import row_records
from memory_service.shard.freeze import frozen_config, frozen_records
from memory_service.shard.accesses import Accesses
from memory_service.shard.homes import Homes
from memory_service.shard.move_gate import MoveGate
from memory_service.shard.placer import Placer
from memory_service.shard.quotas import NamespaceQuota, Quotas, TableUse, bytes_per_row
from memory_service.shard.recovery import Recovery
from memory_service.shard.step_parts import StepParts
from memory_service.shard.table_stores import TableStores
from memory_service.sharding import shard_of
from memory_service.storage.store import TableSnapshot, TableStore, Update
from memory_service.storage.tiers.base import RowRecords
from memory_service.storage.tiers.shared_arena import SharedArena
from memory_service.tables import Announcement, TableInfo, TablePush

T = TypeVar("T")
log = logging.getLogger(__name__)
FLUSH_CHUNK_ROWS = 1024  # dirty rows a flush writes per hold of the lock (~5-10 ms at width 64 with Adam state)
FLUSH_PAUSE_S = 0.001  # between chunks: requests waiting for the lock get it


class Shard:
    """Shard `shard_id` of `num_shards`: rows r with r % num_shards == shard_id of every table.

    With `storage.path` set it is a cold shard with disk: every table's written rows live in an
    LMDB environment in that directory (reopening the directory recovers them), DRAM keeps at
    most `storage.dram_budget_bytes` of them, and a background `Placer` moves rows between the two
    following the placement policy. Call `close()` to write dirty rows back and close the files.
    Every change is in its write-ahead log before it is acknowledged, so a shard reopened after a
    crash recovers every acknowledged change (memory_service/durability/journal.py, memory_service/shard/recovery.py); an all-DRAM
    shard loses everything with its process. A push or commit with a `request_seq` is applied once
    however often it is re-sent (the journal remembers it).
    A "hot" `role` shard is home of the hot rows id % num_shards instead (memory_service/shard/homes.py).
    `device` (a torch device name, for a shard without `storage.path`) keeps every table's rows and
    optimizer state in a DeviceTier arena there, so a hot shard on a GPU gathers the rows it serves in
    GPU memory; None keeps them in host DRAM (numpy).
    `quotas`: the namespaces' quotas of rows and bytes (shard/quotas.py); a cold shard enforces its
    share of each, a hot shard none (its rows are counted by the cold shards they came from)."""

    def __init__(self, shard_id: int, num_shards: int, storage: StorageConfig | None = None,
                 role: str = "cold", track_accesses: bool = False, device: str | None = None,
                 quotas: Iterable[NamespaceQuota] = ()) -> None:
        if not 0 <= shard_id < num_shards:
            raise InvalidArgument(f"shard id {shard_id} must be in [0, {num_shards})")
        if device is not None and storage is not None and storage.path is not None:
            raise InvalidArgument(f"device {device!r} is for all-DRAM shards; a shard with storage.path "
                                  f"{storage.path!r} keeps its rows in host DRAM over LMDB")
        self.shard_id, self.num_shards, self.device = shard_id, num_shards, device
        self.homes = Homes(role)  # a hot shard is shard `shard_id` of the `num_shards` hot ones
        self.quotas = Quotas(quotas if role == "cold" else (), shard_id, num_shards)
        self.track_accesses = track_accesses  # keep reads for placement (hot shards, tiers) to drain
        self.storage = storage if storage is not None else StorageConfig()
        self._accesses = Accesses(self.storage.access_log_ids, self.storage.access_log_expiry_s)
        self.counters = ShardCounters()
        self.shared = self._shared_arena(role) if device is None else None  # host rows for same-host readers
        self._tables = TableStores(shard_id, num_shards, self.storage, device, self.shared)  # table -> its TableStore
        # data-parallel parts of the steps not complete yet, bounded and expiring (step_parts.py)
        self._parts = StepParts(self.storage.parts_max_bytes, self.storage.parts_client_max_bytes,
                                self.storage.parts_expiry_s)
        self._collisions: dict[str, CollisionSketch] = {}  # tables with collision stats on
        # one lock serialises requests; with a shared arena it also versions it (SeqLock)
        self._lock = self.shared.lock() if self.shared is not None else threading.Lock()
        self._stepped = threading.Condition(self._lock)  # notified when a table's step advances
        self._flushing = threading.Lock()  # held by a flush in progress (taken before _lock)
        self.placer: Placer | None = None
        self.moves = MoveGate()  # a hot shard's migrator asks it before each round; checkpoints pause it
        self.journal = Journal()  # requests applied once; a cold shard's logs its changes too
        self._recovery: Recovery | None = None  # with a write-ahead log: what its checkpoints store
        self._closed = False
        if self.storage.path is not None:
            self._open_disk()

    def _shared_arena(self, role: str) -> SharedArena | None:
        """The shared-memory directory of this shard's host DRAM arenas, or None (not asked for,
        the reader not built, or no /dev/shm here: clients then Fetch every row)."""
        if not (self.storage.direct_reads and compiled.AVAILABLE):
            return None
        try:
            arena = SharedArena(hot=role == "hot")
        except OSError as err:
            log.warning("shard %d: no shared-memory arena (%s): same-host clients will Fetch", self.shard_id, err)
            return None
        self.homes.on_change = self._publish_homes
        return arena

    def _publish_homes(self, name: str) -> None:
        if self.shared is not None and name in self.shared.tables:
            self.shared.tables[name].set_homes(self.homes.ids(name))

    def busy(self) -> bool:
        """Whether a request holds the shard's lock now (a hint: it may be let go the next moment)."""
        return self._lock.locked()

    def direct_reads(self) -> tuple[str, bytes]:
        """(directory, nonce) of the shared arena same-host clients read rows from; ("", b"")
        where there is none."""
        return ("", b"") if self.shared is None else (self.shared.path, self.shared.nonce)

    def note_direct_reads(self, requests: dict[str, np.ndarray], fetches: int,
                          table_reads: dict[str, int] | None = None, computed: dict[str, int] | None = None) -> None:
        """Ids (n,) per table that a client read straight from the shared arena in `fetches`
        fetches (`table_reads`: of those, the fetches naming each table; `computed`: the ids of
        each it computed from the seed, never written): counted and recorded for placement as
        fetches' reads are, so stats and migration see every read."""
        computed = computed or {}
        with self._lock:
            checked = self._checked_requests(requests)
            for name, ids in checked.items():
                if not 0 <= computed.get(name, 0) <= len(ids):
                    raise InvalidArgument(f"announce: table {name!r}: {computed[name]} computed of {len(ids)} "
                                          "direct reads")
            self._note_reads(checked, fetches, table_reads)
            for name, ids in checked.items():
                self._tables[name].note_reads(ids, computed.get(name, 0))

    def _open_disk(self) -> None:
        """Opens the LMDB directory and the tables it holds, recovers what its write-ahead log
        holds and starts placement."""
        self._tables.open_disk()
        if self.storage.wal:
            self._open_journal()
        self.placer = Placer(self._lock, self._tables.values, self.storage.placement_interval_s,
                             self.storage.max_moves, housekeeping=self._flush_if_due)
        self.placer.start()

    def _open_journal(self) -> None:
        """Opens the write-ahead log, replays it over the tables (recovery.py), checkpoints, and
        logs every table's changes from now on."""
        wal = WriteAheadLog(os.path.join(self.storage.path, "wal"), self.storage.wal_fsync)
        self.journal = Journal(wal, self._tables.disk, self.storage.flush_interval_s, self.storage.flush_wal_bytes)
        self._recovery = Recovery(self._tables, self.homes, self._parts, self.journal)
        self._recovery.recover(self.shard_id, self.storage.path)
        self._checkpoint()
        for name, store in self._tables.items():
            store.journal = self.journal.for_table(name)

    def flush(self) -> None:
        """Writes every dirty row to LMDB and starts a new write-ahead log (a checkpoint), so a
        restart replays only what came after it. A cold shard does this by itself when its log
        grows past `storage.flush_wal_bytes` or `storage.flush_interval_s` passes, and on close.

        It does not stop the shard: under the lock it notes the log position and the rows dirty
        then (journal.begin_checkpoint: cheap), writes those rows to LMDB FLUSH_CHUNK_ROWS at a
        time, taking the lock for each chunk only, and completes the checkpoint under the lock at
        the end. A row changed meanwhile is dirty again (and its change is in the log after the
        marker); a crash before the end replays from the previous checkpoint (journal.py)."""
        with self._flushing:  # one flush at a time
            with self._lock:
                if not self.journal.durable or self._closed or self.journal.failed is not None:
                    return
                pending = self.journal.begin_checkpoint(self._recovery.snapshot())
                dirty = self._tables.dirty()
            for store, ids in dirty:
                for start in range(0, len(ids), FLUSH_CHUNK_ROWS):
                    time.sleep(FLUSH_PAUSE_S)  # waiting requests take the lock between chunks
                    with self._lock:
                        if store.closed or self._closed:
                            break
                        store.flush(ids[start:start + FLUSH_CHUNK_ROWS])
            with self._lock:
                if not self._closed:
                    self.journal.end_checkpoint(pending)

    def _checkpoint(self) -> None:
        """A whole checkpoint under the lock the caller holds (opening, drop, restore, close)."""
        if not self.journal.durable:
            return
        self._tables.flush()
        self.journal.checkpoint(self._recovery.snapshot())

    def _flush_if_due(self) -> None:
        """The placer's housekeeping (called without the lock): expired steps dropped, and a flush
        when the journal says so."""
        with self._lock:
            if self._closed:
                return
            self._expire_parts()
            due = self.journal.due()
        if due:
            self.flush()

    def close(self) -> None:
        """Stops placement, writes dirty rows back, empties the write-ahead log and closes the
        LMDB files (a cold shard; an all-DRAM shard has nothing to close). The shard serves nothing
        afterwards; closing again does nothing."""
        if self.placer is not None:
            self.placer.stop()
        with self._flushing, self._lock:  # after a flush in progress
            if self._closed:
                return
            self._closed = True
            if self._tables.disk is not None and self.journal.failed is None:
                self._checkpoint()  # the log is empty afterwards: a reopen replays nothing
            self._tables.close()
            self.journal.close()
            if self.shared is not None:
                self.shared.close()

    def create_table(self, cfg: TableConfig) -> TableInfo:
        """Creates the table; re-creating with the identical config is a no-op."""
        with self._lock:
            store = self._tables.get(cfg.name)
            if store is None:
                store = self._add_table(cfg)
                store.journal = self.journal.for_table(cfg.name)
            elif store.cfg != cfg:
                diff = ", ".join(checks.config_diff(store.cfg, cfg))
                raise TableExists(f"table {cfg.name!r} exists with a different config: {diff}")
            return self._tables.info(cfg.name)

    def _add_table(self, cfg: TableConfig) -> TableStore:
        """A new, empty table `cfg`, with its collision stats if it keeps them."""
        store = self._tables.add(cfg)
        self._publish_homes(cfg.name)  # rows of a re-created table may have moved already
        if cfg.collision_sample_rate > 0:
            self._collisions[cfg.name] = CollisionSketch(cfg.collision_sample_rate)
        return store

    def freeze_table(self, name: str, quantization: str = "none") -> TableInfo:
        """Freezes table `name` in place (freeze.py): its store swapped for a frozen one holding
        the same rows (quantized if asked) and step log, no optimizer state. A no-op for a table
        frozen so already. FailedPrecondition while a step of it is incomplete (pushed without a
        commit, or data-parallel parts held).

        On disk nothing is lost at any point: the frozen rows are written to LMDB beside the
        table's (TableStores.stage), a checkpoint then leaves the write-ahead log empty of the old
        table, and one LMDB transaction swaps the two (DiskEnvironment.replace_table). A crash
        before the swap reopens the table unfrozen (the staged copy dropped), one after it
        frozen."""
        with self._lock:
            store = self._tables.store(name)
            cfg = frozen_config(store.cfg, quantization)
            if cfg is None:
                return self._tables.info(name)
            open_steps = [table for table, _, _ in self._parts.held()] + [table for table, _, _ in self._parts.voters()]
            if store.committed != store.step or name in open_steps:
                raise FailedPrecondition(f"table {name!r} has an incomplete step (at {store.step}, complete "
                                         f"{store.committed}): commit it before freezing")
            with self.journal.change():  # dense Adam catches rows up as it reads them
                records = frozen_records(store, cfg)
            log = store.optimizer.log_state()
            if self._tables.disk is not None:
                frozen = self._swap_staged(cfg, log, records)
            else:
                sketch = self._collisions.pop(name, None)
                self._tables.remove(name)
                frozen = self._add_table(cfg)
                if sketch is not None:
                    self._collisions[name] = sketch
                frozen.load_log_state(log)
                frozen.import_rows(records)
            frozen.journal = self.journal.for_table(name)
            self._checkpoint()
            return self._tables.info(name)

    def _swap_staged(self, cfg: TableConfig, log: dict[str, np.ndarray], records: RowRecords) -> TableStore:
        """freeze_table's swap on a shard with LMDB: the frozen table `cfg` staged in LMDB whole,
        the log checkpointed, then swapped in for the table of that name in one transaction."""
        staged = self._tables.stage(cfg)
        staged.load_log_state(log)
        staged.import_rows(records)
        self._checkpoint()  # the old table's changes (dense Adam's catch-ups) in LMDB, not in the log
        frozen = self._tables.replace(staged)
        self._publish_homes(cfg.name)
        return frozen

    def describe_table(self, name: str) -> TableInfo:
        with self._lock:
            return self._tables.info(name)

    def drop_table(self, name: str) -> None:
        with self._lock:
            self._tables.store(name)  # NOT_FOUND
            self._tables.remove(name)
            self._collisions.pop(name, None)
            self.homes.drop(name)
            self._accesses.drop(name)
            self._parts.drop_table(name)
            self._checkpoint()  # the log's records of the dropped table are never replayed
            self._stepped.notify_all()  # fetches waiting on it answer NOT_FOUND

    def list_tables(self) -> list[str]:
        with self._lock:
            return sorted(self._tables)

    def fetch(self, requests: dict[str, np.ndarray], min_step: int = 0,
              timeout: float | None = None, cancelled: threading.Event | None = None) -> dict[str, np.ndarray]:
        """Rows of each table's ids (n,) -> (n, width) float32, in the ids' order, repeats kept,
        read once every table's step is >= `min_step` (StepNotReached after `timeout` seconds).
        `cancelled`: set through `cancel_wait` when the caller went away, it ends the wait with
        Cancelled."""
        with self._lock:
            checked = self._checked_requests(requests)  # table -> ids (n,) int64
            if min_step > 0:
                self._wait_for_step(checked, min_step, timeout, cancelled)
            for name, ids in checked.items():
                self.homes.check(name, ids)  # after any wait: a row may have moved meanwhile
            self._note_reads(checked)
            with self.journal.change():  # dense Adam catches rows up as it reads them
                return self._tables.read(checked)  # table -> rows (n, width) float32

    def cancel_wait(self, cancelled: threading.Event) -> None:
        """Sets `cancelled` and wakes the held fetches, so the one it was given to ends now."""
        with self._stepped:
            cancelled.set()
            self._stepped.notify_all()

    def _wait_for_step(self, checked: dict[str, np.ndarray], min_step: int, timeout: float | None,
                       cancelled: threading.Event | None = None) -> None:
        """Waits, the lock released meanwhile, until every table of `checked` is at step
        `min_step` (StepNotReached after `timeout` seconds; NOT_FOUND for a table dropped
        meanwhile). The ids are a look-ahead read until then: placement may act on them now."""
        for name, ids in checked.items():
            if self._tables[name].committed < min_step:
                self._expect(name, ids, min_step)
        gone = cancelled.is_set if cancelled is not None else (lambda: False)
        if not self._stepped.wait_for(lambda: gone() or self._tables.reached(checked, min_step), timeout):
            steps = {name: self._tables.store(name).committed for name in checked}
            raise StepNotReached(f"fetch waited {timeout:.1f} s for step {min_step}; tables are at {steps}")
        if gone():
            raise Cancelled(f"fetch: the caller went away while it waited for step {min_step}")
        for name in checked:
            self._tables.store(name)  # dropped while this fetch waited

    def _note_reads(self, checked: dict[str, np.ndarray], fetches: int = 1,
                    table_reads: dict[str, int] | None = None) -> None:
        """Counts `fetches` fetches of these reads (`table_reads`: per table, if not all named
        every table) and, on a shard that keeps them, records the reads for placement."""
        self._expire_parts()
        self.counters.fetch_requests += fetches
        self.counters.fetch_rows += sum(len(ids) for ids in checked.values())
        for name in checked:
            self._tables[name].reads += fetches if table_reads is None else table_reads.get(name, 0)
        if self.track_accesses:
            for name, ids in checked.items():
                self._accesses.record(name, ids)

    def announce(self, requests: dict[str, np.ndarray], step: int | None = None) -> None:
        """Ids (n,) per table that a fetch of a later step will read: placement's look-ahead
        (DRAM/LMDB inside a cold shard, hot/cold migration). `step`: the min_step that fetch will
        carry (a held fetch is tagged with its own), so placement can merge the parts of one step
        that other shards got and order the steps; None: read after those announced before. Only
        a hint: ids of rows that moved away since the client routed them inform placement all the
        same and change nothing."""
        checks.check_announced_step(step)
        with self._lock:
            for name, ids in self._checked_requests(requests).items():
                self._expect(name, ids, step)

    def _expect(self, name: str, ids: np.ndarray, step: int | None) -> None:
        """Checked ids (n,) of table `name` that the fetch of `step` will take: the look-ahead of
        the DRAM/LMDB placement of a cold shard and, on shards that keep reads, of the hot/cold
        migration."""
        self._tables[name].expect(ids, step)
        if self.track_accesses:
            self._accesses.expect(name, ids, step)

    def push(self, client_id: str, pushes: dict[str, TablePush], contributors: int = 1,
             commit: bool = True, request_seq: int = 0, announce: Announcement | None = None) -> int:
        """Applies each table's gradients at its step; returns the number of distinct rows updated.

        With `commit` the step is complete at once: fetches waiting for it are answered. Without,
        the sender commits it (`commit`) after all its requests of the step arrived — several
        requests per shard when rows moved under it — and only then do reads see the step.
        With `contributors` K > 1 this is one worker's part of the step: parts are held and their
        sum applied once, when K distinct `client_id`s sent (with `commit`) or committed (without)
        theirs. Otherwise `client_id` names the sender for logs and metrics.
        A request re-sent with the `request_seq` (> 0) of one already applied is answered with its
        first answer and not applied again.
        `announce`: ids a later fetch will read (`announce`'s look-ahead riding on the push, saving
        its round trip), checked with the push (a bad one refuses the push whole) and handed to
        placement once the push is applied. A hint, not state: the journal does not log it, and a
        re-sent push (already applied) does not announce again.
        """
        checks.check_contributors(contributors)
        if announce is not None:
            checks.check_announced_step(announce.step)
        with self._lock:
            if (done := self.journal.applied(client_id, request_seq)) is not None:
                return done  # re-sent: its first answer
            self._expire_parts()
            checked = {name: self._checked_push(name, push) for name, push in pushes.items()}
            announced = {} if announce is None else self._checked_requests(announce.ids)
            # every table's update computed and checked before anything changes (or is logged)
            whole = self._completed_parts(client_id, checked, contributors, commit) if contributors > 1 else checked
            updates = self._tables.prepare(whole)
            if self.quotas:  # rows this push would store, checked against their namespaces' quotas
                self.check_quotas({name: _ids_of(checked[name], updates.get(name)) for name in checked})
            with self.journal.change(client_id, request_seq) as change:
                if contributors > 1:
                    self._hold_parts(client_id, checked, contributors, whole)
                self._note_push(pushes)
                change.result = self._tables.apply(updates, commit)
            for name, ids in announced.items():
                self._expect(name, ids, announce.step)
            self._stepped.notify_all()
            return change.result

    def _completed_parts(self, client_id: str, checked: dict[str, TablePush], contributors: int,
                         is_whole: bool) -> dict[str, TablePush]:
        """{table: the sum of its step's parts} of the steps whose K-th part this push is (with
        `is_whole`; without, a client may send several requests of its part, and its commit counts
        instead), summed as `_hold_parts` will hold them. Checks every table's part first: the
        parts agree (InvalidArgument), their step did not expire (StepExpired), and the parts held
        stay within their bounds (LimitReached). Changes nothing."""
        for name, push in checked.items():
            self._parts.check_part(name, push.step, client_id, contributors, push.lr, is_whole)
        complete = {}
        for name, push in checked.items():
            clients, ids, grads = self._held_parts(name, push.step)
            if is_whole and len(clients | {client_id}) == contributors:
                complete[name] = checks.summed_parts(self._tables[name], push.step, push.lr,
                                                     [*ids, push.ids], [*grads, push.grads])
        held = {name: push for name, push in checked.items() if name not in complete}  # completing parts are not held
        self._parts.check_room(client_id, sum(p.ids.nbytes + p.grads.nbytes for p in held.values()),
                               [(name, push.step) for name, push in held.items()])
        return complete

    def _held_parts(self, name: str, step: int) -> tuple[set[str], list[np.ndarray], list[np.ndarray]]:
        """(clients, ids, grads) of the parts held of table `name`'s step, in the order they came."""
        for table, held_step, parts in self._parts.held():
            if (table, held_step) == (name, step):
                return parts.clients, parts.ids, parts.grads
        return set(), [], []

    def _hold_parts(self, client_id: str, checked: dict[str, TablePush], contributors: int,
                    complete: dict[str, TablePush]) -> None:
        """Holds each table's part of its step, except where it completes the step (`complete`,
        summed by `_completed_parts`): those steps' parts are done."""
        for name, push in checked.items():
            self._parts.add_part(name, push.step, client_id, contributors, push.lr, push.ids, push.grads)
            self.journal.note(name, "part", push.step, client_id, contributors, push.lr, push.ids, push.grads)
            if name in complete:
                self._parts.forget(name, push.step)
                self.journal.note(name, "parts_done", push.step)

    def _note_push(self, pushes: dict[str, TablePush]) -> None:
        self.counters.push_requests += 1
        self.counters.push_rows += sum(len(p.ids) for p in pushes.values())  # repeats counted

    def commit(self, client_id: str, steps: dict[str, tuple[int, float | None]], contributors: int = 1,
               request_seq: int = 0) -> int:
        """Step `step` of each table {name: (step, lr)} is complete for `client_id`: every one of
        its requests of the step arrived. With K > 1 contributors, the K-th distinct client's commit
        applies the sum of the parts held. Returns rows updated. A re-sent `request_seq` is
        answered as the first time, as in `push`."""
        checks.check_contributors(contributors)
        with self._lock:
            if (done := self.journal.applied(client_id, request_seq)) is not None:
                return done  # re-sent: its first answer
            self._expire_parts()
            updates = self._check_commits(client_id, steps, contributors)
            if self.quotas:
                self.check_quotas({name: _ids_of(None, update) for name, update in updates.items()})
            with self.journal.change(client_id, request_seq) as change:
                change.result = sum(self._commit_step(client_id, name, step, lr, contributors, updates.get(name))
                                    for name, (step, lr) in steps.items())
            self._stepped.notify_all()
            return change.result

    def _check_commits(self, client_id: str, steps: dict[str, tuple[int, float | None]],
                       contributors: int) -> dict[str, Update]:
        """InvalidArgument (or NOT_FOUND) unless every table's commit can be applied: checked
        before any change. Returns {table: its update} of the steps this commit completes with
        parts held (K > 1 contributors), computed and checked (TableStores.prepare)."""
        whole = {}
        for name, (step, lr) in steps.items():
            checks.check_not_frozen(self._tables.store(name))
            checks.check_step(name, step, "commit step")
            checks.check_lr(self._tables.store(name), step, lr)
            if contributors > 1:
                self._parts.check_vote(name, step, client_id)
                voters = next((clients for table, s, clients in self._parts.voters() if (table, s) == (name, step)), set())
                _, ids, grads = self._held_parts(name, step)
                if len(voters | {client_id}) >= contributors and ids:
                    whole[name] = checks.summed_parts(self._tables[name], step, lr, ids, grads, is_push=False)
        return self._tables.prepare(whole)

    def _expire_parts(self) -> None:
        """Drops the data-parallel steps not complete within storage.parts_expiry_s of their first
        part or commit (under the lock), logged so that a replay drops them too."""
        due = self._parts.due()
        if not due:
            return
        with self.journal.change():
            for name, step in due:
                self._parts.expire_step(name, step)
                self.journal.note(name, "parts_expired", step)
        log.warning("shard %d: data-parallel steps %s expired after %g s without every contributor; dropped",
                    self.shard_id, due[:8], self.storage.parts_expiry_s)

    def _commit_step(self, client_id: str, name: str, step: int, lr: float | None, contributors: int,
                     update: Update | None) -> int:
        """Completes table `name`'s step `step` for `client_id`; returns rows updated. With K > 1
        contributors the step completes at the K-th client's commit, which applies the parts' sum
        (`update`, prepared by `_check_commits`)."""
        store = self._tables[name]
        if contributors > 1:
            num_votes = self._parts.vote(name, step, client_id)
            self.journal.note(name, "vote", step, client_id)
            if num_votes < contributors:
                return 0
            self._parts.forget(name, step)
            self.journal.note(name, "parts_done", step)
            if update is not None:
                store.write_update(update, commit=False)
        store.commit(step, lr)
        return 0 if update is None or update.batch is None else len(update.batch.ids)

    # -- hot and cold shards ----------------------------------------------------------------------
    def export_rows(self, name: str, ids: np.ndarray, version: int, client_id: str = "",
                    request_seq: int = 0) -> RowRecords:
        """Hands distinct rows `ids` (n,) over for a move: removed here with their optimizer state,
        refused (RowsMoved) from now on. Only rows ever written come back. A re-sent
        (client_id, request_seq) gets the same rows again (its first answer was lost), and the
        rows handed over stay remembered (journal.MAX_EXPORTS exports), so that `return_rows`
        can take them back should their destination refuse them."""
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
        others are computed from the seed wherever they are), exported by their previous home.
        Rows this shard is home of already are kept as they are: an import re-sent after a crash
        of the migrating hot shard (server/migration.py resumes its moves) must not overwrite
        rows updated since they arrived."""
        with self._lock:
            ids = self._checked_ids(name, records.ids if ids is None else ids)
            checks.check_records(name, records, ids, self._checked_ids(name, records.ids),
                                 packed=self._tables[name].cfg.is_quantized)
            if not (away := self.homes.away(name, ids)).all():
                ids, records = ids[away], records.take(self.homes.away(name, records.ids))
            with self.journal.change():
                self.journal.note(name, "import", ids, records.ids, records.rows, records.state, records.last, version)
                self._tables[name].import_rows(records)
                self.homes.arrive(name, ids, version)

    def return_rows(self, name: str, ids: np.ndarray, version: int, client_id: str, request_seq: int) -> int:
        """Takes back the rows among distinct `ids` (n,) that export (client_id, request_seq)
        handed over, when their destination refused them: they are served here again exactly as
        they left, from the export's answer this shard remembers (its own rows: not checked again,
        so rows the destination refused as non-finite are kept, not lost). Ids served here already
        are skipped, so a re-sent return changes nothing. Returns the ids taken back;
        FailedPrecondition if some id is away and the export is not remembered (or was of another
        table). Logged as an import: a crash afterwards recovers them here."""
        with self._lock:
            ids = self._checked_ids(name, ids)
            if len(np.unique(ids)) != len(ids):
                raise InvalidArgument(f"table {name!r}: returned ids must be distinct")
            ids = ids[self.homes.away(name, ids)]
            if not len(ids):
                return 0
            export = self.journal.export_of(client_id, request_seq)
            if export is None or export[0] != name:
                raise FailedPrecondition(
                    f"table {name!r}: {self.homes.role} shard {self.shard_id} does not remember export "
                    f"({client_id!r}, {request_seq}) of this table, so it cannot take back row {ids[0]}")
            records = export[1].take(np.isin(export[1].ids, ids))
            with self.journal.change():
                self.journal.note(name, "import", ids, records.ids, records.rows, records.state, records.last, version)
                self._tables[name].import_rows(records)
                self.homes.arrive(name, ids, version)
            return len(ids)

    def forget_export(self, client_id: str, request_seq: int) -> None:
        """Drops the copy of export (client_id, request_seq) kept for `return_rows`: its rows all
        landed (the hot shard's own exports, whose copies would otherwise hold up to
        journal.MAX_EXPORTS batches of rows)."""
        with self._lock:
            self.journal.forget_export(client_id, request_seq)

    # -- whole row records: import and export (shard/row_records.py) ----------------------------
    def read_records(self, name: str, ids: np.ndarray) -> RowRecords:
        """Records of `ids` (n,) as they stand at the table's step (row_records.peek): a dense
        Adam table first catches the rows up as a Fetch would (and keeps them, counted as reads)."""
        with self._lock:
            ids = self._checked_ids(name, ids)
            self.homes.check(name, ids)
            store = self._tables[name]
            _refuse_quantized(store.cfg, "read as records (Fetch its rows)")
            if store.optimizer.catches_up:
                with self.journal.change():  # the caught-up rows are logged, as a Fetch's are
                    self._tables.read({name: ids})
            return row_records.peek(store, ids)

    def step_log(self, name: str) -> dict[str, np.ndarray]:
        """Table `name`'s step log (optimizer.log_state(): step, steps (k,), lrs (k,))."""
        with self._lock:
            return self._tables.store(name).optimizer.log_state()

    def write_records(self, name: str, records: RowRecords, has_state: bool,
                      log: dict[str, np.ndarray] | None = None) -> int:
        """Sets rows `records` (row_records.checked_write), after the step log `log`
        (optimizer.log_state()'s form) when given; logged before it answers. Returns the rows set."""
        with self._lock:
            store = self._tables.store(name)
            _refuse_quantized(store.cfg, "written (write its rows, then freeze it with a quantization)")
            self.homes.check(name, self._checked_ids(name, records.ids))
            if self.quotas:
                self.check_quotas({name: np.asarray(records.ids, np.int64)})
            if log is not None:
                row_records.checked_log(name, int(log["step"]), log["steps"], log["lrs"])
            step = store.step if log is None else int(log["step"])
            records = row_records.checked_write(store, records, has_state, step)
            if log is not None:
                if row_records.log_matches(store, int(log["step"]), log["steps"], log["lrs"]):
                    log = None
            with self.journal.change():
                if log is not None:
                    store.load_log_state(log)
                    for step, lr in zip(log["steps"].tolist(), log["lrs"].tolist()):
                        self.journal.note(name, "step", step, lr)
                    self.journal.note(name, "commit", int(log["step"]))
                self.journal.note(name, "rows", records.ids, records.rows, records.state, records.last)
                store.import_rows(records)
            self._stepped.notify_all()
            return len(records)

    # -- checkpoints (memory_service/durability/checkpoint.py) ------------------------------------------------
    def checkpoint_tables(self, step: int, names: list[str], timeout: float,
                          write: Callable[[TableSnapshot], T]) -> dict[str, T]:
        """{table: write(its snapshot)} for `names` (all tables when empty), as they stand once
        every one of them is at table step `step`, complete: a checkpoint is consistent at one
        step. Waits up to `timeout` seconds for the step's commits (data-parallel workers' parts
        may still be arriving); FailedPrecondition if a table is at another step then.

        A shard with LMDB does not stop while `write` runs: it flushes (Shard.flush, in chunks),
        then under the lock writes what was dirtied since and opens an LMDB read transaction, whose
        snapshot `write` reads after the lock is released. An all-DRAM shard calls `write` under
        the lock (its rows have no snapshot to read from)."""
        if self._tables.disk is not None:
            self.flush()  # most dirty rows to LMDB without holding the shard
        with self._lock:
            names = sorted(self._tables) if not names else list(names)
            for name in names:
                self._tables.store(name)
            self._stepped.wait_for(lambda: self._tables.reached(names, step), timeout)
            for name in names:
                store = self._tables.store(name)  # dropped while we waited: NOT_FOUND
                if store.committed != step or store.step != step:
                    raise FailedPrecondition(
                        f"table {name!r} on {self.homes.role} shard {self.shard_id} is at step {store.step} "
                        f"(complete: {store.committed}), not at the checkpoint's step {step}")
            if self._tables.disk is None:
                return {name: write(self._tables[name].snapshot()) for name in names}
            self._tables.flush(names)  # what changed since the flush above (not a log checkpoint)
            reading = ExitStack()  # the read transaction, closed after `write` ran
            try:
                txn = reading.enter_context(self._tables.disk.reader())
                snapshots = {name: self._tables[name].snapshot(txn) for name in names}
            except BaseException:
                reading.close()
                raise
        with reading:
            return {name: write(snapshot) for name, snapshot in snapshots.items()}

    def restore_table(self, cfg: TableConfig, log: dict[str, np.ndarray], chunks: Iterable[RowRecords]) -> int:
        """Creates table `cfg` as a checkpoint saved it: its step log (`optimizer.log_state()`),
        then its rows with their optimizer state from `chunks`, each one stored exactly (in the
        tiers of a cold shard with disk). Returns the rows taken. FailedPrecondition if the table
        exists here; on any error the table is dropped again, so a failed restore leaves nothing."""
        with self._lock:
            if cfg.name in self._tables:
                raise FailedPrecondition(f"table {cfg.name!r} exists on {self.homes.role} shard {self.shard_id}: "
                                         f"restore onto shards that do not hold the checkpoint's tables")
            store = self._add_table(cfg)
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
            return self._tables.store(name).state_dict()

    def state_width(self, name: str) -> int:
        """Optimizer-state values per row of table `name`."""
        with self._lock:
            return self._tables.store(name).state_width

    def hot_map(self, name: str) -> tuple[int, np.ndarray]:
        """(version, sorted ids) of the rows of `name` this hot shard is home of."""
        with self._lock:
            self._tables.store(name)
            return self.homes.version, self.homes.ids(name)

    def drain_accesses(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """{table: its access events since the last call, in order: (READ, the distinct ids of a
        fetch served) or (step or UNTAGGED, the ids of a look-ahead)}; at most
        storage.access_log_ids ids, the oldest events dropped first, none older than
        storage.access_log_expiry_s (accesses.py), so the reply fits one gRPC message."""
        with self._lock:
            return self._accesses.drain()

    def caller_state(self) -> dict[str, int]:
        """What this shard keeps for its callers beside the tables' rows, each bounded and expiring
        (StorageConfig): data-parallel parts held ("parts_bytes") for "open_steps" steps, the
        access log's ids ("access_log_ids"), and the step logs' bytes ("step_log_bytes", an entry
        per step pushed)."""
        with self._lock:
            return {"parts_bytes": self._parts.nbytes, "open_steps": len(self._parts),
                    "access_log_ids": self._accesses.num_ids,
                    "step_log_bytes": sum(self._tables[name].optimizer.log.nbytes for name in self._tables)}

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
        dram_row_bytes, disk_row_bytes = store.row_bytes()
        return TableUsage(name=cfg.name, num_rows=cfg.num_rows, width=cfg.width, step=store.step,
                          rows_read=store.rows_read, optimizer_rows=store.optimizer_rows,
                          optimizer_state_bytes=state, tiers=store.tier_usage(), dram_row_bytes=dram_row_bytes,
                          disk_row_bytes=disk_row_bytes, wire_row_bytes=cfg.wire_row_bytes, reads=store.reads,
                          labels=cfg.labels)

    def owns(self, ids: np.ndarray) -> bool:
        """Whether every id (n,) lives on this shard."""
        return bool(np.all(shard_of(ids, self.num_shards) == self.shard_id))

    def digest(self) -> str:
        """sha256 over every table's digest, in name order: equal iff no state changed."""
        with self._lock:
            return self._tables.digest()

    def check_quotas(self, writes: dict[str, np.ndarray]) -> None:
        """QuotaExceeded (RESOURCE_EXHAUSTED) unless writing rows `writes` {table: checked ids (n,)
        of this shard} keeps every namespace within its share of its quota here; under the lock,
        before anything changes (push, commit; an import of rows calls it too). Costs nothing for
        namespaces without a quota; for the others it looks up which ids are stored already."""
        writes = {name: ids for name, ids in writes.items() if self.quotas.applies(name) and len(ids)}
        if not writes:
            return
        new_rows = {name: int((self._tables[name].writer.last_of(ids) < 0).sum()) for name, ids in writes.items()}
        uses = []
        for name, store in self._tables.items():
            if self.quotas.applies(name):  # rows moved to a hot shard still count here (quotas.py)
                uses.append(TableUse(name, store.num_materialized + len(self.homes.ids(name)),
                                     bytes_per_row(store.cfg.width, store.state_width)))
        self.quotas.check_new_rows(new_rows, uses)

    def _checked_requests(self, requests: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{table: its ids as (n,) int64} of a fetch or look-ahead, every id checked."""
        return {name: self._checked_ids(name, ids) for name, ids in requests.items()}

    def _checked_ids(self, name: str, ids: np.ndarray) -> np.ndarray:
        """ids of table `name` as (n,) int64, or InvalidArgument naming the first bad id."""
        return checks.checked_ids(name, ids, self._tables.store(name).cfg.num_rows, self.shard_id, self.num_shards)

    def _checked_push(self, name: str, push: TablePush) -> TablePush:
        """`push` as the store applies it: step, distinct ids (m,) int64, their summed grads
        (m, width) f32, lr; else InvalidArgument (or RowsMoved)."""
        checks.check_not_frozen(self._tables.store(name))
        ids = self._checked_ids(name, push.ids)
        self.homes.check(name, ids)
        return checks.checked_push(self._tables[name], push, ids)


def _ids_of(push: TablePush | None, update: Update | None) -> np.ndarray:
    """The distinct ids (n,) a push part and an update write, together."""
    ids = [push.ids] if push is not None else []
    if update is not None and update.batch is not None:
        ids.append(update.batch.ids)
    return np.unique(np.concatenate(ids)) if len(ids) > 1 else ids[0] if ids else np.empty(0, np.int64)


def _refuse_quantized(cfg: TableConfig, what: str) -> None:
    """FailedPrecondition for a quantized table: its stored rows are packed codes, not records."""
    if cfg.is_quantized:
        raise FailedPrecondition(f"table {cfg.name!r} is quantized ({cfg.quantization}): its rows cannot be {what}")
