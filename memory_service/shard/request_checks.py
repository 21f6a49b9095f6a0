"""The checks of a request's arguments at a shard's public edge, and a push's canonical form.

`Shard` validates a whole request (every table, every id, every gradient) before it changes any
state, so a rejected request, even one naming several tables, changes nothing. These functions
are those checks: each returns the checked value or raises InvalidArgument naming the bad value
and the bound. A checked push is summed over duplicate ids here (`sum_duplicates`): the optimizer's
update is non-linear, so it must see each row once, as torch's `grad.coalesce()` before SparseAdam.
Finite gradients can still sum past float32's range (`check_finite_sum`), and an update can still
overflow in the optimizer: TableStore.prepare_update checks the values it would store.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.native import kernels
from memory_service.sharding import shard_of
from memory_service.storage.store import TableStore
from memory_service.storage.tiers.base import RowRecords
from memory_service.tables import TablePush

MAX_CONTRIBUTORS = 65536  # data-parallel workers whose parts one step may sum


def config_diff(a: object, b: object, prefix: str = "") -> list[str]:
    """'field: a != b' for each differing field of two config dataclasses, nested ones flattened."""
    diffs = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            diffs += config_diff(x, y, f"{prefix}{f.name}.")
        elif x != y:
            diffs.append(f"{prefix}{f.name} {x!r} != {y!r}")
    return diffs


def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids (n,), grads (n, w) -> distinct ids (m,) sorted, summed grads (m, w), in id order."""
    if not len(ids):
        return ids, grads
    order = np.argsort(ids, kind="stable")
    native = kernels.active() and grads.dtype == np.float32 and grads.ndim == 2
    ids, grads = ids[order], kernels.gather(np.ascontiguousarray(grads), order) if native else grads[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # (m,) first of each run
    if len(starts) == len(ids):
        return ids, grads
    if native:  # the same float32 sums, in the same order, in one pass
        return ids[starts], kernels.sum_runs(grads, starts)
    with np.errstate(over="ignore"):  # a sum past float32's range: check_finite_sum refuses it
        return ids[starts], np.add.reduceat(grads, starts, axis=0)


def check_contributors(contributors: int) -> None:
    if not 1 <= contributors <= MAX_CONTRIBUTORS:
        raise InvalidArgument(f"contributors {contributors} must be in [1, {MAX_CONTRIBUTORS}]")


def check_announced_step(step: int | None) -> None:
    """ValueError (INVALID_ARGUMENT) unless an announced step is None or >= 0."""
    if step is not None and step < 0:
        raise ValueError(f"announced step {step} must be >= 0")


def check_step(name: str, step: object, what: str = "step") -> None:
    """InvalidArgument unless `step` is an integer >= 1 (`what`: how the message names it)."""
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise InvalidArgument(f"table {name!r}: {what} {step} must be an integer >= 1")


def check_lr(store: TableStore, step: int, lr: float | None) -> None:
    """InvalidArgument unless table `store` can log learning rate `lr` at `step`."""
    try:
        store.optimizer.checked_lr(step, lr)
    except ValueError as err:
        raise InvalidArgument(f"table {store.cfg.name!r}: {err}") from None


def checked_ids(name: str, ids: np.ndarray, num_rows: int, shard_id: int, num_shards: int) -> np.ndarray:
    """ids of table `name` (of `num_rows` rows) as (n,) int64, all of shard `shard_id` of
    `num_shards`, or InvalidArgument naming the first bad id."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgument(f"table {name!r}: row ids must be a 1-D integer array, "
                              f"got {ids.dtype} of shape {ids.shape}")
    bad = (ids < 0) | (ids >= num_rows)  # before the int64 cast: a uint64 id may not fit
    if bad.any():
        raise InvalidArgument(f"table {name!r}: row id {ids[bad.argmax()]} out of range "
                              f"[0, {num_rows})")
    ids = ids.astype(np.int64, copy=False)
    shards = shard_of(ids, num_shards)
    if (foreign := shards != shard_id).any():
        i = foreign.argmax()
        raise InvalidArgument(f"table {name!r}: row id {ids[i]} belongs to shard {shards[i]} "
                              f"of {num_shards}, not to shard {shard_id}")
    return ids


def check_records(name: str, records: RowRecords, ids: np.ndarray, record_ids: np.ndarray,
                  packed: bool = False) -> None:
    """InvalidArgument unless `records` (their ids `record_ids` (k,), checked) can be stored as
    moved rows `ids` (n,), checked: distinct ids, the records' among them, finite values (not
    checked for `packed` rows: a quantized table's codes are bytes, not numbers), steps >= 0."""
    if len(np.unique(ids)) != len(ids) or len(np.unique(record_ids)) != len(record_ids):
        raise InvalidArgument(f"table {name!r}: imported ids must be distinct")
    if not np.isin(record_ids, ids).all():
        raise InvalidArgument(f"table {name!r}: imported records name ids outside the moved ids")
    if not packed and not (np.isfinite(records.rows).all() and np.isfinite(records.state).all()):
        raise InvalidArgument(f"table {name!r}: imported rows and optimizer state must be finite")
    if len(records.last) and records.last.min() < 0:
        raise InvalidArgument(f"table {name!r}: imported last step {records.last.min()} must be >= 0")


def check_not_frozen(store: TableStore) -> None:
    """FailedPrecondition for a frozen table: it takes no push, commit or step."""
    if store.cfg.frozen:
        raise FailedPrecondition(f"table {store.cfg.name!r} is frozen: it takes no push or commit")


def checked_push(store: TableStore, push: TablePush, ids: np.ndarray) -> TablePush:
    """`push` to table `store`, whose ids (n,) were checked into `ids`, as the store can apply
    it: integer step, distinct ids (m,) int64 sorted, their summed grads (m, width) float32;
    else InvalidArgument."""
    name = store.cfg.name
    check_step(name, push.step)
    grads = _checked_grads(name, push.grads, ids, store.cfg.width)
    num_ids = len(ids)
    ids, grads = sum_duplicates(ids, grads)
    if len(ids) < num_ids:  # finite gradients of a repeated id may sum past float32's range
        check_finite_sum(name, ids, grads)
    checked = TablePush(int(push.step), ids, grads, push.lr)
    check_push(store, checked)
    return checked


def summed_parts(store: TableStore, step: int, lr: float | None, ids: list[np.ndarray],
                 grads: list[np.ndarray], is_push: bool = True) -> TablePush:
    """The data-parallel parts (ids (n_i,), grads (n_i, width)) of table `store`'s step summed, as
    the store applies them (StepParts.take sums them the same way), or InvalidArgument if a sum is
    not finite or (`is_push`: the K-th part came in a push) the store cannot take it now."""
    summed_ids, summed = sum_duplicates(np.concatenate(ids), np.concatenate(grads))
    check_finite_sum(store.cfg.name, summed_ids, summed)
    push = TablePush(step, summed_ids, summed, lr)
    if is_push:
        check_push(store, push)
    return push


def check_finite_sum(name: str, ids: np.ndarray, grads: np.ndarray) -> None:
    """InvalidArgument naming the first row id (m,) whose summed gradient (m, width) is not finite."""
    if not np.isfinite(grads).all():
        i = np.isfinite(grads).all(axis=1).argmin()
        raise InvalidArgument(f"table {name!r}: the summed gradient of row id {ids[i]} is not finite "
                              f"(finite gradients of one row summed past float32's range)")


def check_push(store: TableStore, push: TablePush) -> None:
    """InvalidArgument unless table `store` can apply `push` (distinct ids) at its step now."""
    try:
        store.check_push(push.ids, push.step, push.lr)
    except ValueError as err:
        raise InvalidArgument(f"table {store.cfg.name!r}: {err}") from None


def _checked_grads(name: str, grads: np.ndarray, ids: np.ndarray, width: int) -> np.ndarray:
    """Gradients (n, width) of rows `ids` (n,) as float32, or InvalidArgument."""
    grads = np.asarray(grads)
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
    return grads
