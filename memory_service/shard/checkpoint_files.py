"""A shard's part of a checkpoint: it writes its own tables' files and, on restore, reads the rows
it is home of, so no table ever passes through the driver or is held whole in one process.

Save (`save_shard`): once every table is at the checkpoint's step, each table's written rows stream
from a snapshot of it (Shard.checkpoint_tables: on a shard with LMDB, an LMDB read transaction
opened after the dirty DRAM rows were flushed, read while the shard goes on serving; on an all-DRAM
shard, the arena under the shard's lock) into `<dir>/<table>.rows.npy`, 64k records at a time,
hashed as they are written; the step log goes to `<table>.log.npy` (one (step int64, lr float64)
record per step a push or commit named, in step order; checkpoints saved before had a float64 rate
per step 0..step, nan where none was pushed, and are still read). A rows file is a plain .npy of one record per row
ever written, in id order:

    id int64 | row float32[width] | state float32[state_width] | last int64   (little-endian)

(`np.load(path, mmap_mode="r")` reads one anywhere). Files are fsynced; the driver's manifest,
written after every shard answered, is what makes them a checkpoint; a shard whose save fails
removes its folder again.

Paths: a shard reads and writes checkpoints only inside its cluster's checkpoint root
(StorageConfig.checkpoint_root, default `checkpoints/` under the storage path), resolved with every
symlink and `..` (`checkpoint_folder`): a request naming anything outside is refused
(InvalidArgument) before a file is touched, and files are created without following symlinks.

Restore (`restore_shard`): cold shard j of N reads, from every saved shard's file that can hold
such rows, the records with id % N == j, in chunks, and stores them exactly (TableStore.import_rows:
into the tiers of a cold shard with disk). A saved shard i of M holds ids = i (mod M), which meet
j (mod N) only if i = j (mod gcd(M, N)); the other files are skipped, so restoring onto the same
number of shards reads each file once. Rows saved by hot shards go to their cold homes: a hot
shard starts empty after a restore (it gets the tables and their step logs, no rows) and its
migrator brings hot rows back. Every file a shard reads is checked against the manifest's sha256
before any table is created, and a shard whose restore fails drops what it created.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from memory_service.errors import CheckpointCorrupt, FailedPrecondition, InvalidArgument
from memory_service.durability.manifest import FileEntry, Manifest, ShardEntry, TableEntry, fsync_dir
from memory_service.shard.shard import Shard
from memory_service.storage.optimizer import optimizer_of
from memory_service.storage.store import TableSnapshot, state_width_of
from memory_service.storage.tiers.base import RowRecords

CHUNK_ROWS = 65536  # records written or read at a time


def shard_dir(role: str, shard_id: int, num_shards: int) -> str:
    """The folder of one shard's files inside a checkpoint."""
    return f"{'shard' if role == 'cold' else 'hot'}-{shard_id:04d}-of-{num_shards:04d}"


def file_stem(table: str) -> str:
    """A file name for any table name (names hold '/' and may be 256 characters): a readable
    slug of it and 8 bytes of its sha256."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", table)[:64].lstrip(".")
    return f"{slug}-{hashlib.sha256(table.encode()).hexdigest()[:16]}"


def record_dtype(width: int, state_width: int) -> np.dtype:
    """One row of a rows file."""
    return np.dtype([("id", "<i8"), ("row", "<f4", (width,)), ("state", "<f4", (state_width,)), ("last", "<i8")])


# -- save -------------------------------------------------------------------------------------------
def save_shard(shard: Shard, root: str, step: int, names: list[str], wait_s: float) -> ShardEntry:
    """Writes the tables `names` (all when empty) of `shard` at table step `step` under checkpoint
    directory `root` (inside the cluster's checkpoint root: see `checkpoint_folder`); returns the
    files. A save that fails removes the shard's folder again, so nothing it wrote is left."""
    base = checkpoint_folder(shard, root)
    folder = shard_dir(shard.homes.role, shard.shard_id, shard.num_shards)

    def write(store: TableSnapshot) -> list[FileEntry]:
        stem = f"{folder}/{file_stem(store.cfg.name)}"
        return [_write_rows(base, f"{stem}.rows.npy", store),
                _write_log(base, f"{stem}.log.npy", store)]

    try:
        (base / folder).mkdir()
    except FileExistsError:
        raise FailedPrecondition(f"{root!r} holds a {folder} already: each save writes into a new directory") from None
    except OSError as err:
        raise FailedPrecondition(f"{folder} cannot write its checkpoint files under {root!r}: {err}") from None
    try:
        written = shard.checkpoint_tables(step, names, wait_s, write)
        fsync_dir(base / folder)
    except OSError as err:  # disk full, permissions: the driver removes the unfinished checkpoint
        shutil.rmtree(base / folder, ignore_errors=True)
        raise FailedPrecondition(f"{folder} cannot write its checkpoint files under {root!r}: {err}") from None
    except BaseException:
        shutil.rmtree(base / folder, ignore_errors=True)
        raise
    return ShardEntry(shard.homes.role, shard.shard_id, shard.num_shards,
                      tuple(f for files in written.values() for f in files))


class _HashingFile:
    """Writes to a file and hashes what it wrote (np.lib.format writes headers through it)."""

    def __init__(self, f) -> None:
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def _write_npy(base: Path, rel: str, dtype: np.dtype, num: int, blocks: Iterator[np.ndarray]) -> tuple[int, str]:
    """Writes a (num,) .npy of `dtype` from `blocks`, fsynced; returns (bytes, sha256)."""
    # O_NOFOLLOW: a symlink planted in the folder is not followed out of the checkpoint root
    fd = os.open(base / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        out = _HashingFile(f)
        npy_format.write_array_header_1_0(out, {"descr": npy_format.dtype_to_descr(dtype),
                                                "fortran_order": False, "shape": (num,)})
        written = 0
        for block in blocks:
            assert block.dtype == dtype
            out.write(block.tobytes())
            written += len(block)
        assert written == num, f"{rel}: {written} records written, {num} expected"
        f.flush()
        os.fsync(f.fileno())
    return out.bytes, out.sha256.hexdigest()


def _write_rows(base: Path, rel: str, table: TableSnapshot) -> FileEntry:
    dtype = record_dtype(table.cfg.stored_width, table.state_width)

    def blocks() -> Iterator[np.ndarray]:
        for chunk in table.records(CHUNK_ROWS):
            block = np.empty(len(chunk), dtype)
            block["id"], block["row"], block["state"], block["last"] = chunk.ids, chunk.rows, chunk.state, chunk.last
            yield block

    size, digest = _write_npy(base, rel, dtype, table.num_rows, blocks())  # every written row
    return FileEntry(rel, size, digest, "rows", table.cfg.name, table.num_rows)


LOG_DTYPE = np.dtype([("step", "<i8"), ("lr", "<f8")])  # one step of a step log file


def _write_log(base: Path, rel: str, table: TableSnapshot) -> FileEntry:
    log = np.empty(len(table.steps), LOG_DTYPE)
    log["step"], log["lr"] = table.steps, table.lrs
    size, digest = _write_npy(base, rel, LOG_DTYPE, len(log), iter([log]))
    return FileEntry(rel, size, digest, "log", table.cfg.name)


# -- restore ----------------------------------------------------------------------------------------
def restore_shard(shard: Shard, root: str) -> dict[str, int]:
    """Creates every table of checkpoint `root` on `shard` with the rows it is home of (cold
    shard: id % num_shards == shard_id; hot shard: none); returns {table: rows taken}. Checks the
    files it reads first (CheckpointCorrupt); all or nothing."""
    base = checkpoint_folder(shard, root)
    try:
        manifest = Manifest.read(base)
        sources = _sources(manifest, shard)
        logs = {t.name: manifest.shards[0].file(t.name, "log") for t in manifest.tables}
        manifest.verify(base, [s.file(t.name, "rows") for s in sources for t in manifest.tables] + list(logs.values()))
        return _restore_tables(shard, base, manifest, sources, logs)
    except OSError as err:  # permissions, a volume gone: nothing is restored
        raise FailedPrecondition(f"shard {shard.shard_id} cannot read checkpoint {root!r}: {err}") from None


def _restore_tables(shard: Shard, base: Path, manifest: Manifest, sources: list[ShardEntry],
                    logs: dict[str, FileEntry]) -> dict[str, int]:
    """Every table of `manifest` onto `shard`, or none (those created are dropped on failure)."""
    restored: dict[str, int] = {}
    try:
        for table in manifest.tables:
            log = _read_log(base, logs[table.name], table)
            chunks = _rows_of(base, sources, table, shard.shard_id, shard.num_shards)
            restored[table.name] = shard.restore_table(table.config, log, chunks)
    except BaseException:
        for name in restored:
            shard.drop_table(name)
        raise
    return restored


def _sources(manifest: Manifest, shard: Shard) -> list[ShardEntry]:
    """The saved shards whose rows may include some of `shard`'s (none for a hot shard)."""
    if shard.homes.role != "cold":
        return []
    j, n = shard.shard_id, shard.num_shards
    return [s for s in manifest.shards if s.shard_id % math.gcd(s.num_shards, n) == j % math.gcd(s.num_shards, n)]


def _read_log(base: Path, entry: FileEntry, table: TableEntry) -> dict[str, np.ndarray]:
    """The step log of `table` (TableOptimizer.log_state's form), from either file format."""
    try:
        dense = np.load(base / entry.path, mmap_mode="r", allow_pickle=False).dtype == np.dtype("<f8")
    except (OSError, ValueError) as err:
        raise CheckpointCorrupt(f"checkpoint file {entry.path} cannot be read: {err}") from None
    if dense:  # saved before step logs were sparse: a rate per step 0..step
        lrs = _load(base, entry, np.dtype("<f8"), table.step + 1)
        steps = np.flatnonzero(~np.isnan(lrs))
        log = {"step": np.int64(table.step), "steps": steps, "lrs": np.array(lrs[steps], dtype=np.float64)}
    else:
        records = _load(base, entry, LOG_DTYPE, None)
        log = {"step": np.int64(table.step), "steps": np.array(records["step"], dtype=np.int64),
               "lrs": np.array(records["lr"], dtype=np.float64)}
    try:
        optimizer_of(table.config).load_log_state(log)  # checked as the restore will take it
    except ValueError as err:
        raise CheckpointCorrupt(f"checkpoint file {entry.path}: not a step log of table {table.name!r} at "
                                f"step {table.step}: {err}") from None
    return log


def _rows_of(base: Path, sources: list[ShardEntry], table: TableEntry, shard_id: int,
             num_shards: int) -> Iterator[RowRecords]:
    """The saved records of `table` whose home is cold shard `shard_id` of `num_shards`, in
    chunks read from the files of `sources`."""
    cfg = table.config
    dtype = record_dtype(cfg.stored_width, state_width_of(cfg))
    for source in sources:
        entry = source.file(table.name, "rows")
        records = _load(base, entry, dtype, entry.rows)
        for start in range(0, len(records), CHUNK_ROWS):
            block = records[start:start + CHUNK_ROWS]
            block = block[block["id"] % num_shards == shard_id]
            if len(block):
                yield RowRecords(block["id"].astype(np.int64), block["row"].astype(np.float32),
                                 block["state"].astype(np.float32), block["last"].astype(np.int64))
        del records  # closes the file mapping


def _load(base: Path, entry: FileEntry, dtype: np.dtype, num: int | None) -> np.ndarray:
    """A checkpoint .npy mapped read-only, after checking its dtype and length."""
    try:
        array = np.load(base / entry.path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CheckpointCorrupt(f"checkpoint file {entry.path} cannot be read: {err}") from None
    if array.dtype != dtype or array.ndim != 1 or (num is not None and len(array) != num):
        raise CheckpointCorrupt(f"checkpoint file {entry.path} holds {array.dtype} {array.shape}, expected "
                                f"{dtype} ({num if num is not None else 'n'},): not this table's records")
    return array


def checkpoint_folder(shard: Shard, path: str) -> Path:
    """The real directory a checkpoint request names: `path` (absolute, or a name relative to the
    root) with every symlink and `..` resolved, which must lie strictly inside the shard's
    checkpoint root (StorageConfig.checkpoint_dir, resolved likewise) and exist. InvalidArgument
    for a path outside the root, checked before anything is read or written; FailedPrecondition
    when the cluster has no root or the directory is missing on this host."""
    configured = shard.storage.checkpoint_dir
    if configured is None:
        raise FailedPrecondition("this cluster has no checkpoint root: set storage.checkpoint_root (or storage.path, "
                                 "whose checkpoints/ folder is the default) to save or restore checkpoints")
    root = Path(os.path.realpath(configured))
    real = Path(os.path.realpath(path if os.path.isabs(path) else os.path.join(configured, path)))
    if root not in real.parents:
        raise InvalidArgument(f"checkpoint path {path!r} is outside this cluster's checkpoint root {configured!r}: "
                              f"save checkpoints in folders inside it")
    if not real.is_dir():
        raise FailedPrecondition(f"checkpoint directory {path!r} does not exist on this shard's host: shards and "
                                 f"the driver must share the checkpoint root's filesystem")
    return real
