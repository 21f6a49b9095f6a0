"""A shard's DRAM arenas in shared memory, so a client on the same host reads rows without a
request (issue 23: same-host reads at memory speed; the reader is memory_service/wire/direct_reads.py).

The shard's directory under /dev/shm (mode 0700, named for the shard's pid namespace and pid) holds:
  nonce                 16 random bytes: a client that reads the same ones as DirectReads told
                        it shares this host
  shard                 int64 [seq, pid]: seq is odd while the shard's request lock is held
                        (`SeqLock`); pid lets a reader notice the shard died
  t-KEY.hdr             a table's header, int64 fields HEADER (KEY: a digest of the table name)
  t-KEY.index.GEN       its SlotIndex: keys (buckets,) int64, then slots (buckets,) int64
  t-KEY.rows.GEN        its DramTier's rows (capacity, width) float32, then last (capacity,) int64
  t-KEY.homes.GEN       its homes (shard/homes.py), sorted int64: a cold shard's rows that moved
                        to a hot shard, a hot shard's rows it serves; with HAS_DISK clear they tell
                        a reader that a row missing from the arena was never written (its value is
                        computed from the table's seed) rather than served elsewhere
Only rows, their last step and the index are shared; optimizer state, ids and dirty flags stay
private. Files are never resized: an arena or index that grows or shrinks gets new files of a new
generation, the header names them and the old ones are unlinked (a reader still mapping them reads
stale but valid memory, which its version check rejects). The reader trusts a gather only if the
seq it read before and after is the same even number: no request ran in between, so it saw the
state between two requests, never part of one.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import threading

import numpy as np

from memory_service.ids import new_buckets
from memory_service.native import compiled

log = logging.getLogger(__name__)

ROOT = "/dev/shm"
PREFIX = "engram-arena-"
MAGIC = 0x31414E4552474E45  # b"ENGRANA1" little-endian
HEADER = ("magic", "index_gen", "index_bits", "rows_gen", "capacity", "width", "committed", "open_step",
          "flags", "dropped", "homes_gen", "homes_len")  # memory_service/native/arena.c reads them
FIELD = {name: i for i, name in enumerate(HEADER)}
CATCHES_UP = 1  # flags: rows may be behind the committed step (dense Adam): readers check `last`
HAS_DISK = 2  # flags: a row missing from the arena may be on disk
HOT = 4  # flags: a hot shard's table (its homes are the rows it serves, not those that left)


def table_key(name: str) -> str:
    """The file-name-safe key of table `name` (any characters allowed in table names)."""
    return hashlib.sha256(name.encode()).hexdigest()[:24]


def _mapped(path: str, nbytes: int, create: bool) -> mmap.mmap:
    """A shared read-write mapping of `path` (created with `nbytes` when `create`). The pages are
    allocated up front: a full /dev/shm (a container's is 64 MiB by default) then fails here with
    ENOSPC, where a sparse file would kill the shard with SIGBUS on the first write past it."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            except OSError:
                os.unlink(path)
                raise
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _pid_namespace() -> str:
    """This process's pid namespace (pids of shards in other containers mean nothing here)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # the directory was removed under the shard (see `sweep`)
        pass


class SharedTable:
    """One table's shared files: allocates its index and rows arrays and keeps its header."""

    def __init__(self, arena: "SharedArena", name: str, width: int, flags: int) -> None:
        self._arena, self._base = arena, os.path.join(arena.path, f"t-{table_key(name)}")
        self._maps: dict[str, mmap.mmap] = {}  # "index" / "rows" -> the current generation's mapping
        self.disabled = False  # shared memory ran out: private arrays from then on, readers Fetch
        self._hdr_map = _mapped(self._base + ".hdr", 8 * len(HEADER), create=True)
        self.header = np.frombuffer(self._hdr_map, np.int64, len(HEADER))
        self.header[:] = 0
        self.header[FIELD["width"]], self.header[FIELD["flags"]] = width, flags
        self.set_homes(np.empty(0, np.int64))
        self.header[FIELD["magic"]] = MAGIC

    def _new_file(self, kind: str, nbytes: int) -> mmap.mmap:
        gen = self._arena.next_gen()
        new = _mapped(f"{self._base}.{kind}.{gen}", nbytes, create=True)
        old_gen = int(self.header[FIELD[f"{kind}_gen"]])
        if old_gen:
            _unlink(f"{self._base}.{kind}.{old_gen}")
        self.header[FIELD[f"{kind}_gen"]] = gen
        self._maps[kind] = new  # the old mapping lives on in the arrays still viewing it, if any
        return new

    def _disable(self, err: OSError) -> None:
        """No more shared memory for this table: readers see it dropped and Fetch its rows."""
        log.warning("table %s: shared memory for same-host readers ran out (%s): its rows stay private, "
                    "clients Fetch them", self._base, err)
        self.disabled = True
        self.header[FIELD["dropped"]] = 1

    def new_index(self, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and slots arrays of 2**bits buckets (keys -1: empty) in a new index file (private
        arrays once shared memory ran out)."""
        buckets = 1 << bits
        if self.disabled:
            return new_buckets(bits)
        try:
            buf = self._new_file("index", 16 * buckets)
        except OSError as err:
            self._disable(err)
            return new_buckets(bits)
        keys = np.frombuffer(buf, np.int64, buckets)
        keys[:] = -1
        self.header[FIELD["index_bits"]] = bits
        return keys, np.frombuffer(buf, np.int64, buckets, offset=8 * buckets)

    def new_rows(self, capacity: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (capacity, width) float32 and last (capacity,) int64 in a new rows file (private
        arrays once shared memory ran out)."""
        if self.disabled:
            return np.empty((capacity, width), np.float32), np.empty(capacity, np.int64)
        try:
            buf = self._new_file("rows", capacity * (4 * width + 8))
        except OSError as err:
            self._disable(err)
            return np.empty((capacity, width), np.float32), np.empty(capacity, np.int64)
        rows = np.frombuffer(buf, np.float32, capacity * width).reshape(capacity, width)
        last = np.frombuffer(buf, np.int64, capacity, offset=4 * capacity * width)
        self.header[FIELD["capacity"]] = capacity
        return rows, last

    def set_homes(self, ids: np.ndarray) -> None:
        """The table's homes now: sorted distinct ids (shard/homes.py)."""
        if self.disabled:
            return
        try:
            buf = self._new_file("homes", 8 * len(ids))
        except OSError as err:
            self._disable(err)
            return
        np.frombuffer(buf, np.int64, len(ids))[:] = ids
        self.header[FIELD["homes_len"]] = len(ids)

    def set_committed(self, step: int) -> None:
        self.header[FIELD["committed"]] = step

    def set_open_step(self, step: int) -> None:
        """`step` was written but not committed (0: none): readers leave the table to Fetch."""
        self.header[FIELD["open_step"]] = step

    def drop(self) -> None:
        """The table is gone: readers remap (and find no header), its files are unlinked."""
        self.header[FIELD["dropped"]] = 1
        for kind in ("index", "rows", "homes"):
            gen = int(self.header[FIELD[f"{kind}_gen"]])
            if gen:
                _unlink(f"{self._base}.{kind}.{gen}")
        _unlink(self._base + ".hdr")


class SharedArena:
    """A shard's shared-memory directory (see the module docstring), or OSError where /dev/shm is
    not there; `lock()` is the shard's request lock that versions it."""

    def __init__(self, hot: bool = False, root: str = ROOT) -> None:
        sweep(root)
        self.hot = hot  # a hot shard's arena (see HOT)
        self.path = os.path.join(root, f"{PREFIX}{_pid_namespace()}-{os.getpid()}-{os.urandom(4).hex()}")
        os.mkdir(self.path, 0o700)
        self.nonce = os.urandom(16)
        with open(os.path.join(self.path, "nonce"), "wb") as f:
            f.write(self.nonce)
        self._shard_map = _mapped(os.path.join(self.path, "shard"), 16, create=True)
        np.frombuffer(self._shard_map, np.int64, 2)[:] = (0, os.getpid())
        self._gen = 0
        self.tables: dict[str, SharedTable] = {}

    def next_gen(self) -> int:
        self._gen += 1
        return self._gen

    def table(self, name: str, width: int, flags: int) -> SharedTable:
        """The shared files of a new table `name` (a dropped one's are gone already)."""
        self.tables[name] = SharedTable(self, name, width, flags | (HOT if self.hot else 0))
        return self.tables[name]

    def drop(self, name: str) -> None:
        if (table := self.tables.pop(name, None)) is not None:
            table.drop()

    def lock(self) -> "SeqLock":
        return SeqLock(self._shard_map)

    def close(self) -> None:
        """Removes the directory (readers still mapping files keep valid, never-changing memory,
        see every table dropped)."""
        for table in self.tables.values():
            table.header[FIELD["dropped"]] = 1
        self.tables.clear()
        shutil.rmtree(self.path, ignore_errors=True)


def sweep(root: str = ROOT) -> None:
    """Removes the directories of this user's shards, in this pid namespace, whose process is gone
    (a crashed shard leaves its directory behind; another container's shards are not ours to judge)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(root, name)
        try:
            namespace, pid = name[len(PREFIX):].split("-")[:2]
            if namespace != _pid_namespace() or os.stat(path).st_uid != os.getuid():
                continue
            pid = int(pid)
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, OSError):
            continue


class SeqLock:
    """The shard's request lock, counting in shared memory: the counter is odd from the moment a
    request holds the lock until it lets go (memory_service/native/arena.c bumps it with fences),
    so a same-host reader knows whether a gather overlapped a change. Usable by
    threading.Condition."""

    def __init__(self, buffer) -> None:
        self._lock = threading.Lock()
        self._seq = buffer
        self._owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        compiled._arena.bump(self._seq)
        self._owner = threading.get_ident()
        return True

    def release(self) -> None:
        self._owner = None
        compiled._arena.bump(self._seq)
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def _is_owned(self) -> bool:  # threading.Condition asks
        return self._owner == threading.get_ident()

    def locked(self) -> bool:
        return self._lock.locked()
