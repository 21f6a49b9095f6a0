"""The disk tier: a cold shard's rows in one LMDB environment on local disk, one named database per
table, so a table far larger than DRAM keeps only its most-read rows in memory.

Records. Key: the row id as 8 bytes big-endian, so LMDB's byte order is id order (sorted request
ids walk the B-tree left to right, and a scan yields rows in id order). Value: the raw
little-endian bytes row (width f32) | state (state_width f32) | last (int64), fixed size per
table. Raw rather than msgpack: with fixed-size values a batch decodes with one `np.frombuffer`
over the joined values, where msgpack needs a Python call per record and would only wrap the same
bytes.

Reads: one read transaction per request, ids deduplicated and sorted, LMDB's get per key from a
loop in C (`map(txn.get, keys)`: no Python per row; faster than py-lmdb's `Cursor.getmulti`, see
`DiskTier._gather`) over chunks of 4096 keys, each chunk's joined values scattered with numpy
straight to the rows' places in the request's record array. Writes: one write transaction
per batch, `putmulti` over sorted keys, encoded in the same chunks. Chunks bound the Python bytes
objects alive at once (see _CHUNK).

The environment is opened with `writemap` and without `sync`: pages a transaction dirties are
written in the shared file mapping (file-backed memory, not the process's anonymous memory: a
2M-row push otherwise mallocs one 4 KiB page per row touched, and LMDB keeps those pages cached
for the environment's life) and a commit costs no fsync (16k random rows took 480 ms with a sync
per commit, 100 ms without, here). A process crash loses no committed transaction (the pages are
in the OS page cache; the shard's write-ahead log, memory_service/durability/journal.py, covers the rows only
DRAM held); an OS crash may lose or damage what was written since the last `sync()` (called on
`close()`, and at each flush with StorageConfig.wal_fsync), so without that the durable state is
the checkpoint (memory_service/durability/checkpoint.py), as for DRAM shards.

Within a request the shard defers this tier's writes (`DiskEnvironment.deferring`) until the
request's write-ahead log record is written, so LMDB never holds a change the log lacks.

`map_size` starts from the tables' sizes (capped) and doubles on `MapFullError`, the failed
transaction retried. Besides the rows each table stores its metadata (the shard passes its config)
and its step log (learning rate of every step), so a shard reopened from the directory recovers
every row, its optimizer state and the step log.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import islice, repeat
from operator import itemgetter
from typing import TypeVar

import lmdb
import msgpack
import numpy as np

from memory_service.storage.tiers.base import RowRecords, Tier
from memory_service.storage.usage import DISK_TIER

T = TypeVar("T")

_KEY = np.dtype(">i8")  # big-endian: LMDB compares keys as bytes
_LR = np.dtype("<f8")
_META_DB = b"meta"
_SHARD_KEY = b"shard"
_TABLE_PREFIX = b"table:"
# Records per read chunk / putmulti call: each makes a Python bytes object per record (~800 B
# for width 64 with Adam state); in chunks, the heap they take stays a few MiB and is reused by the
# next chunk, where one 100k-row call left ~80 MiB of fragmented heap in a cold shard's RssAnon.
_CHUNK = 4096
_SCAN_CHUNK = 65536  # records per scan chunk
_first, _second = itemgetter(0), itemgetter(1)


def record_dtype(width: int, state_width: int) -> np.dtype:
    """One record's bytes: row | state | last, little-endian, packed."""
    return np.dtype([("row", "<f4", (width,)), ("state", "<f4", (state_width,)), ("last", "<i8")])


def _keys(ids: np.ndarray) -> list[bytes]:
    """ids (n,) int64 >= 0 -> their LMDB keys (8 bytes each, big-endian), one C-level pass."""
    return ids.astype(_KEY).view("V8").tolist()


def _ids_of(keys: bytes) -> np.ndarray:
    return np.frombuffer(keys, dtype=_KEY).astype(np.int64)


class DiskEnvironment:
    """The LMDB environment of one cold shard: a directory on local disk holding every table's
    rows, metadata and step log. Not thread-safe: the shard's lock serialises its use (the map
    can only grow while no transaction is open), except `reader()` transactions, read outside
    the lock (a resize waits for them)."""

    def __init__(self, path: str, map_bytes: int = 64 << 20, max_tables: int = 1024) -> None:
        if map_bytes < 1 << 20:
            raise ValueError(f"map_bytes {map_bytes} must be >= 1 MiB")
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.max_tables = max_tables
        self.env = lmdb.open(path, map_size=map_bytes, max_dbs=2 * max_tables + 1, writemap=True,
                             sync=False, readahead=False)
        self.env.reader_check()  # clear reader slots a crashed process left behind
        self._meta = self.env.open_db(_META_DB)
        self.map_growths = 0
        # open `reader()` transactions: they run outside the shard's lock, and the map may only be
        # resized while no transaction of this process is open, so a resize waits for them
        self._readers = 0
        self._no_readers = threading.Condition()
        self._deferred: list[Callable[[lmdb.Transaction], object]] | None = None  # see `deferring`
        self._pending: set[bytes] = set()  # databases with deferred writes

    @contextmanager
    def deferring(self) -> Iterator[list]:
        """Inside, write transactions are queued, not run: the list yielded collects them, for
        `run` once the changes they make are in the write-ahead log (so LMDB never holds a change
        the log lacks). Reading a table written inside is an error (it would miss the write)."""
        assert self._deferred is None, "deferring() does not nest"
        self._deferred = pending = []
        try:
            yield pending
        finally:
            self._deferred = None
            self._pending.clear()

    def run(self, pending: list) -> None:
        """Runs the write transactions `deferring` queued, in order."""
        for fn in pending:
            self.write(fn)

    def _defer(self, db: bytes, fn: Callable[[lmdb.Transaction], object]) -> bool:
        """Queues `fn` if writes are deferred (True), else leaves it to the caller (False)."""
        if self._deferred is None:
            return False
        self._deferred.append(fn)
        self._pending.add(db)
        return True

    def check_unwritten(self, db: bytes) -> None:
        assert db not in self._pending, "a table read after a deferred write to it would miss the write"

    def get_meta(self, key: bytes) -> bytes | None:
        """The shard-level value stored under `key` (not a table's: those start with b"table:")."""
        with self.env.begin(db=self._meta) as txn:
            return txn.get(key)

    def put_meta(self, key: bytes, value: bytes) -> None:
        self.write(lambda txn: txn.put(key, value, db=self._meta))

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    @property
    def used_bytes(self) -> int:
        return (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """fn(txn) in one write transaction, committed on return; on MapFullError the transaction
        is aborted, the map doubled and fn run again (so fn must only write through txn)."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._set_map_size(2 * self.map_size)
                self.map_growths += 1

    def reserve(self, nbytes: int) -> None:
        """Grows the map so that `nbytes` more fit without a MapFullError."""
        need = self.used_bytes + nbytes
        if need > self.map_size:
            page = self.env.stat()["psize"]
            self._set_map_size(-(-need // page) * page)

    def _set_map_size(self, nbytes: int) -> None:
        """Resizes the map once no `reader()` transaction is open (LMDB remaps the file: an open
        transaction of this process would read freed memory)."""
        with self._no_readers:
            self._no_readers.wait_for(lambda: self._readers == 0)
            self.env.set_mapsize(nbytes)

    @contextmanager
    def reader(self) -> Iterator[lmdb.Transaction]:
        """A read transaction for use outside the shard's lock, on one thread: a snapshot of
        every table as committed when it opened (LMDB's MVCC), unchanged by later writes, which
        go on meanwhile (pages it still sees are not reused, so the file may grow while it is
        open). Open it under the lock; the map is grown first to twice the pages in use, so that
        writes meanwhile rarely need a resize (which waits for it to close)."""
        self.reserve(self.used_bytes)
        with self._no_readers:
            self._readers += 1
        try:
            with self.env.begin() as txn:
                yield txn
        finally:
            with self._no_readers:
                self._readers -= 1
                self._no_readers.notify_all()

    def check_shard(self, shard_id: int, num_shards: int) -> None:
        """Records which shard the directory holds; ValueError if it holds another one's rows."""
        with self.env.begin(db=self._meta) as txn:
            stored = txn.get(_SHARD_KEY)
        if stored is None:
            self.write(lambda txn: txn.put(_SHARD_KEY, msgpack.packb([shard_id, num_shards]), db=self._meta))
        elif tuple(msgpack.unpackb(stored)) != (shard_id, num_shards):
            sid, num = msgpack.unpackb(stored)
            raise ValueError(f"{self.path} holds shard {sid} of {num}, not shard {shard_id} of {num_shards}")

    def tables(self) -> dict[str, dict]:
        """name -> the metadata stored with each table."""
        with self.env.begin(db=self._meta) as txn:
            cursor = txn.cursor()
            cursor.set_range(_TABLE_PREFIX)
            out = {}
            for key, value in cursor:
                if not key.startswith(_TABLE_PREFIX):
                    break
                entry = msgpack.unpackb(value)
                out[entry["name"]] = entry["meta"]
        return out

    def open_table(self, name: str, meta: dict, width: int, state_width: int) -> "DiskTier":
        """The table's disk tier, created (with `meta` stored beside it) if new."""
        if name not in self.tables() and len(self.tables()) >= self.max_tables:
            raise ValueError(f"{self.path}: {self.max_tables} tables already (max_tables)")
        db = self._db_of(name)
        self.write(lambda txn: txn.put(_TABLE_PREFIX + _table_key(name),
                                       msgpack.packb({"name": name, "meta": meta, "db": db.decode()}), db=self._meta))
        return DiskTier(self, db, width, state_width)

    def _db_of(self, name: str) -> bytes:
        """The key of the databases holding table `name`'s rows and log: its entry's (a table that
        took a staged table's place keeps that one's), else one derived from the name."""
        with self.env.begin(db=self._meta) as txn:
            raw = txn.get(_TABLE_PREFIX + _table_key(name))
        db = msgpack.unpackb(raw).get("db") if raw is not None else None
        return db.encode() if db else _table_key(name)

    def drop_table(self, name: str) -> None:
        """Deletes the table's rows, step log and metadata."""
        db = self._db_of(name)

        def drop(txn: lmdb.Transaction) -> None:
            self._drop_databases(txn, db)
            txn.delete(_TABLE_PREFIX + _table_key(name), db=self._meta)

        self.write(drop)

    def _drop_databases(self, txn: lmdb.Transaction, db: bytes) -> None:
        for prefix in (b"rows:", b"log:"):
            txn.drop(self.env.open_db(prefix + db, txn=txn), delete=True)

    def replace_table(self, name: str, staged: str) -> None:
        """In one transaction: table `name` takes the rows, step log and metadata of table
        `staged`, which is gone after, and `name`'s own rows and log are deleted. A crash leaves
        one or the other whole, never a mix (how a freeze swaps a table, shard/freeze.py)."""
        old, new = self._db_of(name), self._db_of(staged)

        def swap(txn: lmdb.Transaction) -> None:
            entry = msgpack.unpackb(txn.get(_TABLE_PREFIX + _table_key(staged), db=self._meta))
            self._drop_databases(txn, old)
            txn.delete(_TABLE_PREFIX + _table_key(staged), db=self._meta)
            txn.put(_TABLE_PREFIX + _table_key(name),
                    msgpack.packb({"name": name, "meta": entry["meta"], "db": new.decode()}), db=self._meta)

        self.write(swap)

    def sync(self) -> None:
        """Flushes every committed write to disk."""
        self.env.sync(True)

    def close(self) -> None:
        self.sync()
        self.env.close()


def _table_key(name: str) -> bytes:
    """A fixed-size database name for any table name (LMDB keys are at most 511 bytes)."""
    return hashlib.sha256(name.encode()).hexdigest()[:32].encode()


class DiskTier(Tier):
    """One table's records in its LMDB database (see the module docstring for the layout)."""

    name = DISK_TIER

    def __init__(self, environment: DiskEnvironment, key: bytes, width: int, state_width: int) -> None:
        super().__init__(width, state_width)
        self._environment = environment
        self._env = environment.env
        self._key = key
        self._rows_db = self._env.open_db(b"rows:" + key)
        self._log_db = self._env.open_db(b"log:" + key)
        self.record = record_dtype(width, state_width)

    @property
    def environment(self) -> DiskEnvironment:
        return self._environment

    def _gather(self, ids: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct `ids` (n,) and their sorting permutation `order` -> (found (n,) bool, raw
        records (n, itemsize) uint8 in the order of `ids`, rows of ids not found left unset), in
        one read transaction: keys sorted, so the lookups walk the B-tree left to right, each
        chunk's joined values scattered straight to their request positions (one copy of the bytes
        after LMDB's own, none for reordering).

        The lookups are `map(txn.get, keys)`: a loop in C calling LMDB's get per key, no Python
        code per row. It beats `Cursor.getmulti` on the same sorted keys (18.4 vs 22.2 ms per 16k
        random rows of 1M, values joined either way) because getmulti also copies each key and
        builds a (key, value) tuple per row. A key not stored yields b"" (records are never
        empty), so a chunk whose joined bytes fall short holds misses, found from the lengths."""
        sorted_ids = ids[order]
        found = np.ones(len(ids), dtype=bool)
        size = self.record.itemsize
        # Records handled as raw bytes (n, itemsize): numpy copies and gathers uint8 rows at
        # memcpy speed, structured items one field at a time (7 ms vs 1 ms for 16k records).
        records = np.empty((len(ids), size), dtype=np.uint8)
        with self._env.begin(db=self._rows_db) as txn:  # the shard's lock keeps writers out meanwhile
            for start in range(0, len(ids), _CHUNK):
                where = order[start:start + _CHUNK]
                values = list(map(txn.get, _keys(sorted_ids[start:start + _CHUNK]), repeat(b"")))
                joined = b"".join(values)
                if len(joined) < len(values) * size:
                    got = np.fromiter(map(len, values), dtype=np.int64, count=len(values)) > 0
                    found[where[~got]] = False
                    where = where[got]
                records[where] = np.frombuffer(joined, dtype=np.uint8).reshape(len(where), size)
        return found, records

    def _write(self, fn: Callable[[lmdb.Transaction], object]) -> None:
        """fn(txn) in a write transaction now, or queued while the environment defers writes."""
        if not self._environment._defer(self._key, fn):
            self._environment.write(fn)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._environment.check_unwritten(self._key)
        if not len(ids):
            empty = RowRecords.empty(self.width, self.state_width)
            return np.zeros(0, dtype=bool), empty.rows, empty.state, empty.last
        order = np.argsort(ids)
        if not (ids[order[1:]] == ids[order[:-1]]).any():  # distinct, as the shard asks
            found, records = self._gather(ids, order)
            records = records if found.all() else records[found]
        else:
            uniq, inverse = np.unique(ids, return_inverse=True)
            found_u, records = self._gather(uniq, np.arange(len(uniq)))
            found = found_u[inverse]
            records = np.take(records, inverse[found], axis=0)
        records = self._decode(records)
        return found, records["row"], records["state"], records["last"]

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        """Raw records (m, itemsize) uint8 -> (m,) records (a view)."""
        return raw.view(self.record).reshape(len(raw))

    def put(self, ids: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray,
            log: tuple[int, float] | None = None) -> None:
        """Inserts or overwrites records of distinct ids (n,) in one write transaction, with the
        step log entry `log` = (step, lr) when given."""
        order = np.argsort(ids)
        records = np.empty(len(ids), dtype=self.record)
        records["row"], records["state"], records["last"] = rows[order], state[order], last[order]
        keys = ids[order]
        values = records.view(np.dtype((np.void, self.record.itemsize)))

        def write(txn: lmdb.Transaction) -> None:
            cursor = txn.cursor(db=self._rows_db)
            for start in range(0, len(keys), _CHUNK):
                chunk = slice(start, start + _CHUNK)
                cursor.putmulti(zip(_keys(keys[chunk]), values[chunk].tolist()))
            if log is not None:
                self._put_log(txn, np.array([log[0]]), np.array([log[1]]))

        self._write(write)

    def pop(self, ids: np.ndarray) -> RowRecords:
        self._environment.check_unwritten(self._key)
        if not len(ids):
            return RowRecords.empty(self.width, self.state_width)
        order = np.argsort(ids)
        found, records = self._gather(ids, order)
        keys = _keys(ids[order[found[order]]])  # sorted

        def delete(txn: lmdb.Transaction) -> None:
            for key in keys:
                txn.delete(key, db=self._rows_db)

        self._write(delete)
        records = self._decode(records if found.all() else records[found])
        return RowRecords(ids[found], records["row"].copy(), records["state"].copy(), records["last"].copy())

    def delete(self, ids: np.ndarray) -> None:
        """Removes the records of `ids` (n,) it holds."""
        keys = _keys(np.unique(ids))

        def delete(txn: lmdb.Transaction) -> None:
            for key in keys:
                txn.delete(key, db=self._rows_db)

        self._write(delete)

    def ids(self) -> np.ndarray:
        with self._env.begin(db=self._rows_db) as txn:
            return _ids_of(b"".join(txn.cursor().iternext(keys=True, values=False)))

    def scan(self, chunk: int = _SCAN_CHUNK, txn: lmdb.Transaction | None = None) -> Iterator[RowRecords]:
        """Every record in id order, in chunks of `chunk`; each chunk is read in a transaction of
        its own, so the caller may write between chunks, or all from `txn` (a
        DiskEnvironment.reader snapshot)."""
        start = _keys(np.zeros(1, dtype=np.int64))[0]
        while True:
            with nullcontext(txn) if txn is not None else self._env.begin() as current:
                cursor = current.cursor(db=self._rows_db)
                pairs = []
                if cursor.set_range(start):  # in slices: the GIL is not released inside one, and a
                    records = cursor.iternext()  # snapshot is read beside requests being served
                    while len(pairs) < chunk and (part := list(islice(records, min(_CHUNK, chunk - len(pairs))))):
                        pairs += part
            if not pairs:
                return
            ids = _ids_of(b"".join(map(_first, pairs)))
            records = np.frombuffer(b"".join(map(_second, pairs)), dtype=self.record)
            yield RowRecords(ids, records["row"].copy(), records["state"].copy(), records["last"].copy())
            start = _keys(ids[-1:] + 1)[0]

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return self.count(txn)

    def count(self, txn: lmdb.Transaction) -> int:
        """Records the table holds as transaction `txn` sees it."""
        return txn.stat(self._rows_db)["entries"]

    @property
    def nbytes(self) -> int:
        """Bytes of the table's B-tree pages on disk (rows, state and last together)."""
        with self._env.begin() as txn:
            s = txn.stat(self._rows_db)
        return (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"]

    # --- step log ---

    def _put_log(self, txn: lmdb.Transaction, steps: np.ndarray, lrs: np.ndarray) -> None:
        values = np.asarray(lrs, dtype=_LR).view("V8").tolist()
        txn.cursor(db=self._log_db).putmulti(zip(_keys(np.asarray(steps, dtype=np.int64)), values))

    def save_log(self, steps: np.ndarray, lrs: np.ndarray) -> None:
        """Stores the learning rates `lrs` (k,) float64 of table steps `steps` (k,)."""
        self._write(lambda txn: self._put_log(txn, steps, lrs))

    def load_log(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps (k,) int64, lrs (k,) float64) of every logged step, in step order."""
        with self._env.begin(db=self._log_db) as txn:
            pairs = list(txn.cursor().iternext())
        return (_ids_of(b"".join(map(_first, pairs))),
                np.frombuffer(b"".join(map(_second, pairs)), dtype=_LR).astype(np.float64))
