"""A shard's journal: the requests it applied, and on a cold shard the log that makes them durable.

Two jobs, one object per shard:

1. **Requests applied once.** A client re-sends a Push or CommitStep it heard no answer to (the
   shard restarted, the connection dropped) with the same (client_id, request_seq). The journal
   remembers the last MAX_REQUESTS applied requests and their answers (`applied`), so a re-sent
   one is answered, not applied again. Every shard does this; a cold shard with a write-ahead log
   also keeps the memory across restarts.

2. **A redo log of after-images** (cold shards with a disk directory; memory_service/durability/wal.py holds
   the file format). While a request changes state (`change()`), every change is noted as the
   state it leaves, never as the gradient that made it: the rows, optimizer state and last step of
   every row an update or a catch-up wrote, step-log entries, commits, rows exported to or imported
   from a hot shard, and data-parallel parts held until their step is complete (or dropped when it
   expired: a `parts_expired` record, so a replay drops it too). At the end of the
   request the notes become one WAL record (with the request's id), and only then do the request's
   LMDB writes run (the DiskEnvironment defers them), so LMDB never holds a change the log lacks
   and a crash before the record leaves nothing of the request behind. Replaying a record is exact
   and idempotent: it sets rows to what they became, whichever of them were evicted to LMDB or still
   dirty in DRAM at the crash, with no optimizer run. Replay is `memory_service.shard.recovery`.

A checkpoint (`checkpoint`) follows a flush of every dirty row to LMDB: it stores the last record's
seq (the marker) and what only memory holds (each table's committed step, the rows that moved to a
hot shard, held parts, the recent requests) in LMDB's metadata, in one transaction, then starts a
new log file. Recovery loads that and replays the records after the marker. A shard's periodic
flush takes it in two halves so that it never holds the shard for the whole dirty set
(`begin_checkpoint`: marker and state noted, new log file; then the rows dirty at the marker are
written in chunks between requests; `end_checkpoint`: state stored, older files deleted). Until
the end the old files stay, so a crash meanwhile replays from the previous marker over LMDB rows
that are as new or newer: exact, as after-images are.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import msgpack
import numpy as np

from memory_service.storage.tiers.base import RowRecords
from memory_service.storage.tiers.disk import DiskEnvironment
from memory_service.durability.wal import WriteAheadLog

MAX_REQUESTS = 16384  # applied requests remembered: a client retries for its deadline, far fewer
MAX_EXPORTS = 64  # rows handed to a hot shard kept for a re-sent export (the migrator retries at once)
_SNAPSHOT_KEY = b"journal"


@dataclass
class Change:
    """A request in progress: set `result` (its rows_updated) before the `change()` block ends."""

    result: int = 0


@dataclass(frozen=True)
class PendingCheckpoint:
    """A checkpoint begun (Journal.begin_checkpoint): the state to store, its marker, and the
    count of checkpoints when it began (a whole checkpoint meanwhile supersedes it)."""

    state: dict
    marker: int
    epoch: int


class JournalFailed(RuntimeError):
    """An append to the write-ahead log failed: memory holds changes the disk lacks, so the shard
    takes no more changes (a restart recovers what the log holds)."""


def encode(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


class Journal:
    """The journal of one shard; `wal` None: requests are remembered, nothing is logged (an
    all-DRAM or hot shard, whose rows do not outlive its process anyway)."""

    def __init__(self, wal: WriteAheadLog | None = None, disk: DiskEnvironment | None = None,
                 flush_interval_s: float = 60.0, flush_bytes: int = 256 << 20) -> None:
        assert (wal is None) == (disk is None), "a write-ahead log goes with an LMDB environment"
        self.wal, self.disk = wal, disk  # disk: the shard's LMDB environment (its disk tier)
        self.flush_interval_s, self.flush_bytes = flush_interval_s, flush_bytes
        self.requests: OrderedDict[tuple[str, int], int] = OrderedDict()  # (client, seq) -> result
        # (client, seq) -> (table, the rows an export handed over): its answer, should it be re-sent
        self.exports: OrderedDict[tuple[str, int], tuple[str, RowRecords]] = OrderedDict()
        self.replayed = 0  # WAL records replayed when the shard opened
        self.checkpoints = 0
        self.failed: BaseException | None = None
        self._ops: list | None = None  # notes of the change in progress
        self._last_checkpoint = time.monotonic()

    @property
    def durable(self) -> bool:
        return self.wal is not None

    # -- requests -------------------------------------------------------------------------------
    def applied(self, client_id: str, request_seq: int) -> int | None:
        """The answer (rows_updated) of request (client_id, request_seq) if it was applied."""
        if not request_seq:
            return None
        return self.requests.get((client_id, request_seq))

    def remember(self, client_id: str, request_seq: int, result: int) -> None:
        self.requests[(client_id, request_seq)] = result
        while len(self.requests) > MAX_REQUESTS:
            self.requests.popitem(last=False)

    def exported(self, client_id: str, request_seq: int) -> RowRecords | None:
        """The rows export request (client_id, request_seq) handed over, if it was applied."""
        found = self.export_of(client_id, request_seq)
        return None if found is None else found[1]

    def export_of(self, client_id: str, request_seq: int) -> tuple[str, RowRecords] | None:
        """(table, the rows it handed over) of export request (client_id, request_seq), if it was
        applied and is still remembered (the last MAX_EXPORTS)."""
        return self.exports.get((client_id, request_seq)) if request_seq else None

    def forget_export(self, client_id: str, request_seq: int) -> None:
        self.exports.pop((client_id, request_seq), None)

    def remember_export(self, client_id: str, request_seq: int, table: str, records: RowRecords) -> None:
        if request_seq:
            self.exports[(client_id, request_seq)] = (table, records)
            while len(self.exports) > MAX_EXPORTS:
                self.exports.popitem(last=False)

    @contextmanager
    def change(self, client_id: str = "", request_seq: int = 0) -> Iterator[Change]:
        """A request that may change state: its notes become one WAL record at the end, then its
        deferred LMDB writes run, then (if it has an id and ended without error) it is remembered.
        On an error the changes made so far are logged and written all the same (memory already
        holds them), without the request id: the request failed."""
        change = Change()
        if self.failed is not None:
            raise JournalFailed(f"the write-ahead log failed ({self.failed!r}): restart the shard")
        if not self.durable:
            yield change
            if request_seq:
                self.remember(client_id, request_seq, change.result)
            return
        assert self._ops is None, "journal changes do not nest"
        self._ops, ok, pending = [], False, []
        try:
            with self.disk.deferring() as pending:
                yield change
            ok = True
        finally:
            ops, self._ops = self._ops, None
            request = [client_id, request_seq, change.result] if ok and request_seq else None
            if ops or request:
                self._append({"req": request, "ops": ops})
            self.disk.run(pending)
        if request:
            self.remember(client_id, request_seq, change.result)

    def _append(self, record: dict) -> None:
        try:
            self.wal.append(record)
        except BaseException as err:
            self.failed = err
            raise

    def note(self, table: str, kind: str, *fields) -> None:
        """One change of the request in progress: arrays are stored as their bytes."""
        if not self.durable:
            return
        assert self._ops is not None, f"a {kind!r} change of table {table!r} outside journal.change()"
        self._ops.append([table, kind, *(encode(f) if isinstance(f, np.ndarray) else f for f in fields)])

    def for_table(self, name: str):
        """The `TableStore.journal` callback of table `name` (None without a log)."""
        return (lambda kind, *fields: self.note(name, kind, *fields)) if self.durable else None

    # -- checkpoints ----------------------------------------------------------------------------
    def due(self) -> bool:
        """Whether the log grew past `flush_bytes` or `flush_interval_s` passed since the last
        checkpoint (with anything logged since)."""
        if not self.durable or not self.wal.nbytes:
            return False
        return (self.wal.nbytes >= self.flush_bytes
                or time.monotonic() - self._last_checkpoint >= self.flush_interval_s)

    def checkpoint(self, state: dict) -> None:
        """Every dirty row is in LMDB now (the caller flushed): store the marker and `state`
        (what only memory holds), sync LMDB to disk when the log is fsynced, and rotate the log."""
        marker = self.wal.last_seq
        self._store(self._state(state, marker))
        self.wal.rotate(marker)
        self.checkpoints += 1
        self._last_checkpoint = time.monotonic()

    def begin_checkpoint(self, state: dict) -> "PendingCheckpoint":
        """The first half of a checkpoint that does not hold the shard (Shard.flush): under the
        shard's lock, notes the marker (the last record) and `state` as they stand, and starts a
        new log file for the records after it, the older files kept. The caller then writes every
        row dirty now to LMDB, in chunks with the lock released between them (a row changed
        meanwhile is in a record after the marker), and calls `end_checkpoint`."""
        marker = self.wal.start_next()
        self._last_checkpoint = time.monotonic()
        return PendingCheckpoint(self._state(state, marker), marker, self.checkpoints)

    def end_checkpoint(self, pending: "PendingCheckpoint") -> bool:
        """Completes `pending` (under the lock, once every row dirty at its start is in LMDB):
        stores its state and drops the log files through its marker. Does nothing (False) when a
        whole checkpoint ran meanwhile (it stored a later marker and dropped those files)."""
        if pending.epoch != self.checkpoints:
            return False
        self._store(pending.state)
        self.wal.drop_through(pending.marker)
        self.checkpoints += 1
        return True

    def _state(self, state: dict, marker: int) -> dict:
        """`state` with the marker and what the journal itself holds (requests, exports)."""
        return {**state, "seq": marker,
                "requests": [[c, s, r] for (c, s), r in self.requests.items()],
                "exports": [[c, s, table, *(encode(getattr(records, f)) for f in ("ids", "rows", "state", "last"))]
                            for (c, s), (table, records) in self.exports.items()]}

    def _store(self, state: dict) -> None:
        """Stores a checkpoint's state in LMDB (synced to disk when the log is fsynced)."""
        self.disk.put_meta(_SNAPSHOT_KEY, msgpack.packb(state, use_bin_type=True))
        if self.wal.fsync:
            self.disk.sync()

    def load(self) -> tuple[dict | None, Iterator[dict]]:
        """(the state of the last checkpoint, or None for a directory that never had one; the
        records after its marker, in order). The requests of both are remembered again (the
        exports' answers: by `recovery`, which knows the tables' widths)."""
        raw = self.disk.get_meta(_SNAPSHOT_KEY)
        state = msgpack.unpackb(raw, raw=False, strict_map_key=False) if raw is not None else None
        for client, seq, result in (state or {}).get("requests", []):
            self.remember(client, seq, result)
        return state, self._records((state or {}).get("seq", 0))

    def _records(self, after: int) -> Iterator[dict]:
        for record in self.wal.read(after):
            yield record
            if record["req"]:
                self.remember(*record["req"])
            self.replayed += 1

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()
