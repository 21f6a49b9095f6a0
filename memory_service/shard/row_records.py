"""Whole row records of a table, read and set as stored: what import and export move.

A table imported from a file, or exported to one, travels as records (row, optimizer state, last
step), never as gradients: `peek` reads them exactly as stored (no catch-up, no read counters, no
placement hint: an export must not change the table), `checked_write` turns a WriteRecords into
records the store can take, and `log_matches` decides whether a step log may be set. Shard.read_records
and Shard.write_records call these under the shard's lock.
"""
from __future__ import annotations

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.storage.store import TableStore
from memory_service.storage.tiers.base import RowRecords

NEVER_WRITTEN = -1  # the last step `peek` gives a row the table never stored


def peek(store: TableStore, ids: np.ndarray) -> RowRecords:
    """Records of `ids` (n,), repeats allowed, in their order, exactly as stored: the arena's copy
    where it holds one (it is the current one), else the disk tier's, else the row's initial value,
    a new row's optimizer state and last step NEVER_WRITTEN."""
    width, state_width = store.cfg.width, store.state_width
    distinct, inverse = np.unique(ids, return_inverse=True)  # (u,), (n,)
    rows = np.empty((len(distinct), width), np.float32)
    state = np.empty((len(distinct), state_width), np.float32)
    last = np.full(len(distinct), NEVER_WRITTEN, np.int64)
    slots = store.arena.lookup(distinct)
    held = slots >= 0
    if held.any():
        rows[held], state[held], last[held] = store.arena.records_at(slots[held])
    missing = np.flatnonzero(~held)
    if store.disk is not None and len(missing):
        found, disk_rows, disk_state, disk_last = store.disk.get(distinct[missing])
        at = missing[found]
        rows[at], state[at], last[at] = disk_rows, disk_state, disk_last
        missing = missing[~found]
    if len(missing):
        rows[missing] = store.reader.init_rows(distinct[missing])
        state[missing] = store.optimizer.initial_state(len(missing), width)
    return RowRecords(ids, rows[inverse], state[inverse], last[inverse])


def checked_write(store: TableStore, records: RowRecords, has_state: bool, step: int) -> RowRecords:
    """`records` (ids checked by the caller) as the store takes them, or InvalidArgument: distinct
    ids, finite rows and state, last steps >= 0. Without state, each row gets a new row's optimizer
    state and `step` (the table's, after the write's step log) as its last step (nothing to
    catch up from)."""
    name = store.cfg.name
    if not has_state:
        n = len(records)
        records = RowRecords(records.ids, records.rows,
                             store.optimizer.initial_state(n, store.cfg.width),
                             np.full(n, step, np.int64))
    if len(np.unique(records.ids)) != len(records):
        raise InvalidArgument(f"table {name!r}: written ids must be distinct")
    if not (np.isfinite(records.rows).all() and np.isfinite(records.state).all()):
        raise InvalidArgument(f"table {name!r}: written rows and optimizer state must be finite")
    if len(records.last) and records.last.min() < 0:
        raise InvalidArgument(f"table {name!r}: written last step {records.last.min()} must be >= 0")
    return records


def log_matches(store: TableStore, step: int, steps: np.ndarray, lrs: np.ndarray) -> bool:
    """Whether the table logged exactly this step log already (a resumed import sends it again);
    FailedPrecondition if it logged another one, False if it logged none (set it)."""
    current = store.optimizer.log_state()
    if int(current["step"]) == 0 and not len(current["steps"]):
        return False
    if (int(current["step"]) == step and np.array_equal(current["steps"], steps)
            and np.array_equal(current["lrs"], lrs, equal_nan=True)):
        return True
    raise FailedPrecondition(f"table {store.cfg.name!r} is at step {int(current['step'])} with a step log of its "
                             f"own: a step log (step {step}) is set only on a new table")


def checked_log(name: str, step: int, steps: np.ndarray, lrs: np.ndarray) -> None:
    """InvalidArgument unless (steps (k,), lrs (k,)) is a step log of a table at `step`."""
    if len(steps) != len(lrs):
        raise InvalidArgument(f"table {name!r}: a step log of {len(steps)} steps and {len(lrs)} learning rates")
    if len(steps) and (steps.min() < 1 or steps.max() > step or (np.diff(steps) <= 0).any()):
        raise InvalidArgument(f"table {name!r}: step log steps must increase within [1, {step}]")
    if len(lrs) and not (np.isfinite(lrs).all() and (lrs >= 0).all()):
        raise InvalidArgument(f"table {name!r}: step log learning rates must be finite and >= 0")
