"""Import a `[rows, width]` tensor of a safetensors file as a table, streamed and resumable.

Chunks of `chunk_rows` rows are read from the file's memory map, decoded to float32 (what shards
store) and sent to the shards that own their rows (MemoryClient.write_records: WriteRecords,
logged by each shard before it answers); after each chunk the progress file records it durably
(import_progress.py), so a re-run continues at the first unfinished chunk. The importer holds one
chunk at a time; each shard keeps rows in LMDB under its DRAM budget: neither grows with the table.

A file that is one of our exports (metadata "engram.format") brings its table config and, when it
holds them, the optimizer state, last steps and step log, so the imported table continues training
exactly as the exported one would. Rows the exported table never wrote (last step -1) are left
unwritten: they are computed from the same seed, bit for bit, and cost no storage.

When every chunk is in, the table is read back (ReadRecords) and its checksum (checksum.py)
compared with the file's: `ImportResult.checksum` is recorded in the progress file and printed by
`engram import`.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from memory_service.client import MemoryClient
from memory_service.config import TableConfig
from memory_service.transfer import table_file
from memory_service.transfer.checksum import chunk_digest, digest_of_parts, table_checksum
from memory_service.transfer.import_progress import ImportProgress
from memory_service.transfer.safetensors_file import FLOAT_DTYPES, SafetensorsReader

DEFAULT_CHUNK_ROWS = 65536
VERIFY_ROWS = 16384  # rows read back per request while checking (keeps the replies' memory small)
Progress = Callable[[int, int, float], None]  # (rows done, rows in all, seconds since start)


@dataclass(frozen=True)
class ImportResult:
    """What an import did: rows of the table, chunks written now and skipped as finished before,
    the checksum verified against the shards (None when stopped early by `max_chunks`)."""

    table: str
    num_rows: int
    chunks_written: int
    chunks_skipped: int
    checksum: str | None
    seconds: float  # the whole call, the read-back check included
    verify_seconds: float  # of those, reading the table back to check its checksum
    progress_path: str


def default_progress_path(path: str, table: str) -> str:
    """The progress file beside the imported file: FILE.<table, '/' as '~'>.import.json."""
    return f"{path}.{table.replace('/', '~')}.import.json"


def import_table(client: MemoryClient, path: str, tensor: str, table: str, cfg: TableConfig | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, progress_path: str | None = None,
                 with_state: bool = True, max_chunks: int | None = None,
                 on_progress: Progress | None = None) -> ImportResult:
    """Imports tensor `tensor` (rows, width) of safetensors file `path` as table `table`.

    `cfg`: the table's config (its name is set to `table`); None takes the config an export wrote
    in the file's metadata (ValueError for a file without one). The table is created if absent (an
    existing one must have that config: TableExists otherwise). `with_state`: also import the
    optimizer state, last steps and step log an export holds. `max_chunks`: stop after writing
    that many chunks, as an interrupted import would (a re-run continues; tests and the benchmark
    use it). ValueError for a tensor that is not 2-D float, or whose shape differs from the
    table's; ImportMismatch when the progress file records another import."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows {chunk_rows} must be >= 1")
    started = time.monotonic()
    reader = SafetensorsReader(path)
    try:
        cfg = _checked_config(reader, tensor, table, cfg)
        state = table_file.state_of(reader) if with_state and tensor == table_file.ROWS else None
        if state is not None and cfg.optimizer != table_file.config_of(reader).optimizer:
            raise ValueError(f"{path} holds optimizer state of {table_file.config_of(reader).optimizer}, not of "
                             f"table {table!r}'s {cfg.optimizer}: import it with its own config, or rows only")
        progress = ImportProgress(progress_path or default_progress_path(path, table),
                                  _identity(reader, tensor, table, chunk_rows, state is not None))
        client.create_table(cfg)
        num_chunks = -(-cfg.num_rows // chunk_rows)
        skipped, written = progress.chunks_done, 0
        last = num_chunks if max_chunks is None else min(num_chunks, skipped + max_chunks)
        for chunk, start, rows, digest in _prepared(reader, tensor, range(skipped, last), chunk_rows, cfg.num_rows):
            _write_chunk(client, table, start, rows, state, reader, first=chunk == 0)
            progress.finish(chunk, digest)
            written += 1
            if on_progress is not None:
                on_progress(start + len(rows), cfg.num_rows, time.monotonic() - started)
        checksum, verify_started = None, time.monotonic()
        if progress.chunks_done == num_chunks:
            checksum = verify(client, table, cfg.num_rows, chunk_rows, progress.digests)
            progress.complete(checksum)
        done = time.monotonic()
        return ImportResult(table, cfg.num_rows, written, skipped, checksum, done - started, done - verify_started,
                            progress.path)
    finally:
        reader.close()


def _checked_config(reader: SafetensorsReader, tensor: str, table: str, cfg: TableConfig | None) -> TableConfig:
    """The table's config, checked against the tensor (2-D float, same rows and width)."""
    info = reader.tensor(tensor)
    if len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{reader.path}: tensor {tensor!r} is {info.dtype} of shape {list(info.shape)}; "
                         f"a table imports a 2-D [rows, width] tensor of {', '.join(FLOAT_DTYPES)}")
    if cfg is None:
        cfg = table_file.config_of(reader)
        if cfg is None:
            raise ValueError(f"{reader.path} is not an export of a table (no {table_file.CONFIG_KEY!r} metadata): "
                             f"give the table's config (width, optimizer, ...)")
    cfg = TableConfig(**{**cfg.__dict__, "name": table})
    if (cfg.num_rows, cfg.width) != info.shape:
        raise ValueError(f"{reader.path}: tensor {tensor!r} of shape {list(info.shape)} does not fit table {table!r} "
                         f"of {cfg.num_rows} rows x width {cfg.width}")
    return cfg


def _prepared(reader: SafetensorsReader, tensor: str, chunks: range, chunk_rows: int,
              num_rows: int) -> Iterator[tuple[int, int, np.ndarray, str]]:
    """(chunk, first row, rows (n, width) float32, digest) of each of `chunks`, the next one read,
    decoded, checked and hashed on a thread while the caller writes this one (numpy and sha256
    release the GIL), so the file's side of an import overlaps the shards'; only one chunk is ever
    in flight to the shards (a killed import redoes at most one)."""
    def prepare(chunk: int) -> tuple[int, int, np.ndarray, str]:
        start = chunk * chunk_rows
        rows = reader.rows(tensor, start, min(start + chunk_rows, num_rows))  # (n, width) float32
        _check_finite(reader.path, tensor, start, rows)
        return chunk, start, rows, chunk_digest(rows)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-read") as pool:
        ahead = None
        for chunk in chunks:
            current = prepare(chunk) if ahead is None else ahead.result()
            ahead = pool.submit(prepare, chunk + 1) if chunk + 1 in chunks else None
            yield current


def _check_finite(path: str, tensor: str, start: int, rows: np.ndarray) -> None:
    """ValueError naming the first row of the chunk with a NaN or infinity: nothing of the chunk
    is sent (the shards refuse such rows too, but each only its own)."""
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        raise ValueError(f"{path}: tensor {tensor!r} row {start + int(np.argmin(finite))} is not finite; "
                         f"a table's rows must be")


def _identity(reader: SafetensorsReader, tensor: str, table: str, chunk_rows: int, with_state: bool) -> dict:
    """What a progress file records of its import (a re-run must match it)."""
    return {"file": os.path.abspath(reader.path), "file_bytes": reader.size,
            "file_mtime_ns": os.stat(reader.path).st_mtime_ns,  # a file rewritten in place is another import
            "header_sha256": hashlib.sha256(reader.header_bytes).hexdigest(), "tensor": tensor, "table": table,
            "chunk_rows": chunk_rows, "with_state": with_state}


def _write_chunk(client: MemoryClient, table: str, start: int, rows: np.ndarray,
                 state: table_file.StateTensors | None, reader: SafetensorsReader, first: bool) -> None:
    """Rows [start, start + n) (n, width) float32 to their shards, with their state if any (the step
    log with the first chunk, to every shard)."""
    ids = np.arange(start, start + len(rows), dtype=np.int64)
    if state is None:
        client.write_records(table, ids, rows)
        return
    chunk_state, last = state.rows(reader, start, start + len(rows))
    written = last != table_file.NEVER_WRITTEN  # the others are computed from the same seed
    client.write_records(table, ids[written], rows[written], chunk_state[written], last[written],
                         log=state.log(reader) if first else None)


def verify(client: MemoryClient, table: str, num_rows: int, chunk_rows: int, digests: list[str]) -> str:
    """Reads the table back chunk by chunk and returns its checksum; ValueError naming the first
    chunk whose rows differ from the file's."""
    state_width = client.state_width(table)
    for chunk, expected in enumerate(digests):
        start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, num_rows)
        parts = (client.read_records(table, np.arange(at, min(at + VERIFY_ROWS, stop), dtype=np.int64),
                                     state_width).rows for at in range(start, stop, VERIFY_ROWS))
        if digest_of_parts(parts) != expected:
            raise ValueError(f"table {table!r}: rows {start}..{stop - 1} read back differ from the file's "
                             f"(chunk {chunk}): the import did not land whole")
    return table_checksum(digests, chunk_rows)
