"""Export a table to a safetensors file (table_file.py's layout), streamed chunk by chunk.

Rows come from the shards as they stand at the table's step (MemoryClient.read_records: as
stored, a dense Adam table's caught up first), VERIFY_ROWS at a time, and go to their offsets in
the file: the exporter holds a few MiB whatever the table's size. The checksum is per chunk of
`chunk_rows` rows, as an import of the file computes it. With `with_state` the rows are float32 and the optimizer
state, each row's last step and the table's step log go too, so import -> continued training is
bit-identical to continuing the exported table. The table should not be trained while it is
exported (chunks are read at different moments).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memory_service.client import MemoryClient
from memory_service.transfer import table_file as tf
from memory_service.transfer.checksum import digest_of_parts, table_checksum
from memory_service.transfer.importer import DEFAULT_CHUNK_ROWS, VERIFY_ROWS
from memory_service.transfer.safetensors_file import SafetensorsWriter
from memory_service.wire import codec


def export_table(client: MemoryClient, table: str, path: str, with_state: bool = False,
                 dtype: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> str:
    """Writes table `table` to `path` and returns its rows' checksum (checksum.py, also in the
    file's metadata). `dtype`: "float32" or "bfloat16" for the rows; None: the table's dtype
    (float32 whenever `with_state`: the state continues float32 rows exactly)."""
    cfg = client.table(table)
    dtype = dtype or ("float32" if with_state else cfg.dtype)
    if dtype not in ("float32", "bfloat16") or (with_state and dtype != "float32"):
        raise ValueError(f"export dtype {dtype!r}: float32, or bfloat16 without state")
    if cfg.is_quantized:
        return _export_quantized(client, cfg, path, with_state, dtype, chunk_rows)
    state_width = client.state_width(table)
    log = client.step_log(table)
    writer = SafetensorsWriter(path, _layout(cfg.num_rows, cfg.width, state_width, len(log["steps"]), dtype,
                                             with_state), _metadata(cfg, log, with_state, chunk_rows))
    digests = []
    for start in range(0, cfg.num_rows, chunk_rows):
        stop = min(start + chunk_rows, cfg.num_rows)
        parts = (_write_part(client, writer, table, at, min(at + VERIFY_ROWS, stop), state_width, dtype, with_state)
                 for at in range(start, stop, VERIFY_ROWS))
        digests.append(digest_of_parts(parts))  # per chunk, as an import of the file hashes it
    if with_state:
        writer.write(tf.LOG_STEPS, 0, log["steps"])
        writer.write(tf.LOG_LRS, 0, log["lrs"])
    checksum = table_checksum(digests, chunk_rows)
    writer.set_metadata(tf.CHECKSUM_KEY, checksum)
    writer.close()
    return checksum


def _export_quantized(client: MemoryClient, cfg, path: str, with_state: bool, dtype: str, chunk_rows: int) -> str:
    """A quantized table's rows as Fetch dequantizes them, as a frozen table of those values (its
    codes are not records: ReadRecords refuses them); freeze the import with a quantization to store
    it quantized again. No optimizer state: a frozen table has none."""
    if with_state:
        raise ValueError(f"table {cfg.name!r} is quantized ({cfg.quantization}): export its rows without state")
    plain = dataclasses.replace(cfg, quantization="none")
    writer = SafetensorsWriter(path, _layout(cfg.num_rows, cfg.width, 0, 0, dtype, False),
                               _metadata(plain, {"step": 0, "steps": np.empty(0, np.int64)}, False, chunk_rows))
    digests = []
    for start in range(0, cfg.num_rows, chunk_rows):
        parts = []
        for at in range(start, min(start + chunk_rows, cfg.num_rows), VERIFY_ROWS):
            ids = np.arange(at, min(at + VERIFY_ROWS, start + chunk_rows, cfg.num_rows), dtype=np.int64)
            parts.append(_write_rows(writer, at, np.asarray(client.fetch({cfg.name: ids})[cfg.name]), dtype))
        digests.append(digest_of_parts(parts))
    checksum = table_checksum(digests, chunk_rows)
    writer.set_metadata(tf.CHECKSUM_KEY, checksum)
    writer.close()
    return checksum


def _write_rows(writer: SafetensorsWriter, start: int, rows: np.ndarray, dtype: str) -> np.ndarray:
    """Rows (n, width) float32 written at row `start` in `dtype`; returns them as the file holds
    them, in float32."""
    if dtype == "bfloat16":
        bits = codec.float32_to_bfloat16_bits(rows)
        writer.write(tf.ROWS, start, bits)
        return codec.bfloat16_bits_to_float32(bits)
    writer.write(tf.ROWS, start, rows)
    return rows


def _write_part(client: MemoryClient, writer: SafetensorsWriter, table: str, start: int, stop: int,
                state_width: int, dtype: str, with_state: bool) -> np.ndarray:
    """Rows [start, stop) read from the shards and written to the file; returns them as the file
    holds them, in float32 (what an import of the file hashes)."""
    records = client.read_records(table, np.arange(start, stop, dtype=np.int64), state_width)
    rows = _write_rows(writer, start, records.rows, dtype)
    if with_state:
        if state_width:
            writer.write(tf.STATE, start, records.state)
        writer.write(tf.LAST, start, records.last)
    return rows


def _layout(num_rows: int, width: int, state_width: int, log_steps: int, dtype: str,
            with_state: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = {tf.ROWS: ("F32" if dtype == "float32" else "BF16", (num_rows, width))}
    if with_state:
        if state_width:
            tensors[tf.STATE] = ("F32", (num_rows, state_width))
        tensors.update({tf.LAST: ("I64", (num_rows,)), tf.LOG_STEPS: ("I64", (log_steps,)),
                        tf.LOG_LRS: ("F64", (log_steps,))})
    return tensors


def _metadata(cfg, log: dict[str, np.ndarray], with_state: bool, chunk_rows: int) -> dict[str, str]:
    placeholder = table_checksum([], chunk_rows).split(":")[0] + ":" + "0" * 64  # set at the end
    return {tf.FORMAT_KEY: tf.FORMAT, tf.CONFIG_KEY: tf.config_to_json(cfg), tf.STEP_KEY: str(int(log["step"])),
            "engram.with_state": str(with_state).lower(), tf.CHECKSUM_KEY: placeholder}
