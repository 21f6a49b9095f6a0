"""Freezing a trained table in place: the frozen config, and the rows it keeps.

A frozen table keeps no optimizer state (optimizer.Frozen) and, with a quantization, stores its
rows packed (memory_service/quantization.py). Its rows are what a Fetch returned just before the
freeze (an optimizer that catches up, dense Adam, brings them to the table's step first), kept bit
for bit, or quantized; never-written rows stay unwritten, computed from the seed on read (and
quantized the same way). Shard.freeze_table swaps the table's store for the frozen one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memory_service import quantization as quant
from memory_service.config import QUANTIZATIONS, TableConfig
from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.storage.store import TableStore
from memory_service.storage.tiers.base import RowRecords

CHUNK_ROWS = 65536  # rows read (and quantized) at a time


def frozen_config(cfg: TableConfig, quantization: str) -> TableConfig | None:
    """The config of table `cfg` frozen with `quantization` ("" is "none"), or None when it is so
    already (a no-op). InvalidArgument for an unknown quantization; FailedPrecondition for a
    frozen table with another one (quantized rows cannot be requantized exactly)."""
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise InvalidArgument(f"table {cfg.name!r}: quantization {quantization!r} must be one of {QUANTIZATIONS}")
    if cfg.frozen:
        if cfg.quantization != quantization:
            raise FailedPrecondition(f"table {cfg.name!r} is frozen with quantization {cfg.quantization!r}, "
                                     f"not {quantization!r}")
        return None
    return dataclasses.replace(cfg, frozen=True, quantization=quantization)


def frozen_records(store: TableStore, cfg: TableConfig) -> RowRecords:
    """Every written row of `store` as table `cfg` (frozen) stores it: the rows as a read sees
    them now, quantized where `cfg` says, no optimizer state, the last steps kept. Held whole:
    at most the table's rows on this shard (a quantized copy takes about a quarter of them)."""
    ids_parts, last_parts = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for chunk in store.records(CHUNK_ROWS):  # one pass over the tiers (LMDB included), ids and steps kept
        ids_parts.append(chunk.ids)
        last_parts.append(chunk.last)
    ids, last = np.concatenate(ids_parts), np.concatenate(last_parts)
    parts = []
    for start in range(0, len(ids), CHUNK_ROWS):
        rows = store.read(ids[start:start + CHUNK_ROWS])  # (c, width): as a Fetch sees them
        parts.append(quant.quantize(rows, cfg.quantization) if cfg.is_quantized else rows)
    rows = np.concatenate([np.empty((0, cfg.stored_width), np.float32), *parts])
    return RowRecords(ids, rows, np.empty((len(ids), 0), np.float32), last)
