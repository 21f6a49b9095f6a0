"""Recovery: a cold shard reopened after a crash gets back every change it acknowledged.

The LMDB files hold every row as of the last flush, and more: rows written since (evicted, or
written straight to LMDB by a push) are there too, since a killed process keeps what LMDB
committed (the page cache survives it). What they may lack is whatever only DRAM held: dirty warm
rows, the committed step, rows that moved to a hot shard, held data-parallel parts, recent request
ids. `recover` puts that back: the state the last checkpoint stored (`snapshot`), then every WAL
record after it, in order (`redo`). Each record holds after-images, so replaying one over LMDB
rows that are already newer, or as old as the checkpoint, ends the same: each row as its last
record left it.

These functions read and set the `Shard`'s internals; they live here to keep the shard's module
about serving requests. See memory_service/durability/journal.py for what is logged and when.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from memory_service.durability.journal import encode
from memory_service.storage.tiers.base import RowRecords
from memory_service.durability.wal import WalCorrupt

if TYPE_CHECKING:
    from memory_service.shard.shard import Shard

log = logging.getLogger(__name__)


def snapshot(shard: "Shard") -> dict:
    """What a checkpoint stores beside the flushed rows: the state only memory holds."""
    return {
        "committed": {name: store.committed for name, store in shard._tables.items()},
        "homes": {"version": shard.homes.version,
                  "moved": {name: encode(shard.homes.ids(name)) for name in shard._tables
                            if len(shard.homes.ids(name))}},
        "parts": [[name, step, p.contributors, p.lr, sorted(p.clients),
                   [encode(i) for i in p.ids], [encode(g) for g in p.grads]]
                  for (name, step), p in shard._parts.items()],
        "commits": [[name, step, sorted(clients)] for (name, step), clients in shard._commits.items()],
    }


def restore(shard: "Shard", state: dict) -> None:
    """Sets the shard to a checkpoint's `snapshot` (its rows are in LMDB already)."""
    from memory_service.shard.shard import _Parts

    for name, store in shard._tables.items():
        store.committed = state["committed"].get(name, 0)  # later tables: their commits are in the log
    for name, ids in state["homes"]["moved"].items():
        if name in shard._tables:
            shard.homes.leave(name, _ids(ids), 0)
    shard.homes.version = state["homes"]["version"]
    for name, step, contributors, lr, clients, ids, grads in state["parts"]:
        if name in shard._tables:
            width = shard._tables[name].cfg.width
            shard._parts[(name, step)] = _Parts(contributors, lr, set(clients), [_ids(i) for i in ids],
                                                [_matrix(g, width) for g in grads])
    for name, step, clients in state["commits"]:
        if name in shard._tables:
            shard._commits[(name, step)] = set(clients)
    for client, seq, name, *records in state.get("exports", []):
        if name in shard._tables:
            store = shard._tables[name]
            shard.journal.remember_export(client, seq, name, _records(*records, store.cfg.width,
                                                                      store.warm.state_width))


def redo(shard: "Shard", op: list, request: list | None = None) -> None:
    """Replays one logged change (journal.note's [table, kind, *fields]) of the request
    [client_id, request_seq, result] (None: none)."""
    from memory_service.shard.shard import _Parts

    name, kind, *f = op
    store = shard._tables.get(name)
    if store is None:
        return  # dropped: a drop checkpoints, so only a crash inside drop_table leaves such records
    width, state_width = store.cfg.width, store.warm.state_width
    if kind == "rows":
        store.import_rows(_records(*f[:4], width, state_width))
    elif kind == "step":
        store.redo_step(*f)
    elif kind == "commit":
        store.committed = max(store.committed, f[0])
    elif kind == "export":
        ids = _ids(f[0])
        store.export_rows(ids)
        shard.homes.leave(name, ids, f[1])
        if request:  # the rows it handed over: the answer to the export, should it be re-sent
            shard.journal.remember_export(request[0], request[1], name, _records(*f[2:6], width, state_width))
    elif kind == "import":
        store.import_rows(_records(*f[1:5], width, state_width))
        shard.homes.arrive(name, _ids(f[0]), f[5])
    elif kind == "part":
        step, client, contributors, lr, ids, grads = f
        parts = shard._parts.setdefault((name, step), _Parts(contributors, lr))
        parts.clients.add(client)
        parts.ids.append(_ids(ids))
        parts.grads.append(_matrix(grads, width))
    elif kind == "vote":
        step, client = f
        shard._commits.setdefault((name, step), set()).add(client)
    elif kind == "parts_done":
        shard._parts.pop((name, f[0]), None)
        shard._commits.pop((name, f[0]), None)
    else:
        raise WalCorrupt(f"unknown write-ahead log change {kind!r} of table {name!r}")


def recover(shard: "Shard") -> int:
    """Loads the last checkpoint and replays the log after it; returns records replayed."""
    state, records = shard.journal.load()
    if state is not None:
        restore(shard, state)
    for record in records:
        for op in record["ops"]:
            redo(shard, op, record["req"])
    replayed = shard.journal.replayed
    log.info("shard %d: recovered %s: %d write-ahead log records replayed after record %d",
             shard.shard_id, shard.storage.path, replayed, (state or {}).get("seq", 0))
    return replayed


def _ids(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.int64).copy()


def _matrix(raw: bytes, width: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32).reshape(-1, width).copy()


def _records(ids: bytes, rows: bytes, state: bytes, last: bytes, width: int, state_width: int) -> RowRecords:
    ids = _ids(ids)
    return RowRecords(ids, _matrix(rows, width), np.frombuffer(state, np.float32).reshape(len(ids), state_width).copy(),
                      _ids(last))
