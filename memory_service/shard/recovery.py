"""Recovery: a shard with a disk directory (cold, or hot: hot-NNNN) reopened after a crash gets
back every change it acknowledged.

The LMDB files hold every row as of the last flush, and more: rows written since (evicted, or
written straight to LMDB by a push) are there too, since a killed process keeps what LMDB
committed (the page cache survives it). What they may lack is whatever only DRAM held: dirty
DRAM rows, the committed step, rows that moved to a hot shard, held data-parallel parts, recent
request ids. `Recovery.recover` puts that back: the state the last checkpoint stored (`snapshot`),
then every WAL record after it, in order (`_redo`). Each record holds after-images, so replaying
one over LMDB rows that are already newer, or as old as the checkpoint, ends the same: each row as
its last record left it.

`Recovery` works on the objects that hold a shard's state, handed to it by the shard (its table
stores, homes, step parts and journal), through their public methods. See
memory_service/durability/journal.py for what is logged and when.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from memory_service.durability.journal import Journal, encode
from memory_service.durability.wal import WalCorrupt
from memory_service.shard.homes import Homes
from memory_service.shard.step_parts import Parts, StepParts
from memory_service.storage.store import TableStore
from memory_service.storage.tiers.base import RowRecords

log = logging.getLogger(__name__)


class Recovery:
    """Stores (`snapshot`) and puts back (`recover`) what only a shard's memory holds beside its
    rows: each table's committed step in `stores`, the moved (cold) or held (hot) rows of
    `homes`, the held parts and commits of `parts`, and the rows exported for a re-sent request in
    `journal`."""

    def __init__(self, stores: Mapping[str, TableStore], homes: Homes, parts: StepParts, journal: Journal) -> None:
        self.stores, self.homes, self.parts, self.journal = stores, homes, parts, journal

    def snapshot(self) -> dict:
        """What a checkpoint stores beside the flushed rows: the state only memory holds."""
        return {
            "committed": {name: store.committed for name, store in self.stores.items()},
            "homes": {"version": self.homes.version,
                      "moved": {name: encode(self.homes.ids(name)) for name in self.stores
                                if len(self.homes.ids(name))}},
            "parts": [[name, step, p.contributors, p.lr, sorted(p.clients),
                       [encode(i) for i in p.ids], [encode(g) for g in p.grads], p.client_bytes]
                      for name, step, p in self.parts.held()],
            "commits": [[name, step, sorted(clients)] for name, step, clients in self.parts.voters()],
            "expired": [[name, step] for name, step in self.parts.expired()],
        }

    def recover(self, shard_id: int, path: str) -> int:
        """Loads the last checkpoint and replays the log after it; returns records replayed
        (`shard_id` and `path` name the shard in the log line)."""
        state, records = self.journal.load()
        if state is not None:
            self._restore(state)
        for record in records:
            for op in record["ops"]:
                self._redo(op, record["req"])
        replayed = self.journal.replayed
        log.info("shard %d: recovered %s: %d write-ahead log records replayed after record %d",
                 shard_id, path, replayed, (state or {}).get("seq", 0))
        return replayed

    def _restore(self, state: dict) -> None:
        """Sets the shard to a checkpoint's `snapshot` (its rows are in LMDB already)."""
        for name, store in self.stores.items():
            store.committed = state["committed"].get(name, 0)  # later tables: their commits are in the log
        for name, ids in state["homes"]["moved"].items():
            if name in self.stores:
                self.homes.restore(name, _ids(ids))  # moved away (cold) or held (hot)
        self.homes.version = state["homes"]["version"]
        for name, step, contributors, lr, clients, ids, grads, *client_bytes in state["parts"]:
            if name in self.stores:  # client_bytes: absent from checkpoints before parts were bounded
                width = self.stores[name].cfg.width  # gradients
                self.parts.hold(name, step, Parts(contributors, lr, set(clients), [_ids(i) for i in ids],
                                                  [_matrix(g, width) for g in grads], *client_bytes))
        for name, step, clients in state["commits"]:
            if name in self.stores:
                for client in clients:
                    self.parts.vote(name, step, client)
        for name, step in state.get("expired", []):
            if name in self.stores:
                self.parts.expire_step(name, step)
        for client, seq, name, *records in state.get("exports", []):
            if name in self.stores:
                self.journal.remember_export(client, seq, name, _records(*records, *_widths(self.stores[name])))

    def _redo(self, op: list, request: list | None = None) -> None:
        """Replays one logged change (journal.note's [table, kind, *fields]) of the request
        [client_id, request_seq, result] (None: none)."""
        name, kind, *f = op
        store = self.stores.get(name)
        if store is None:
            return  # dropped: a drop checkpoints, so only a crash inside drop_table leaves such records
        widths = _widths(store)
        if kind == "rows":
            store.import_rows(_records(*f[:4], *widths))
        elif kind == "step":
            store.redo_step(*f)
        elif kind == "commit":
            store.committed = max(store.committed, f[0])
        elif kind == "export":
            ids = _ids(f[0])
            store.export_rows(ids)
            self.homes.leave(name, ids, f[1])
            if request:  # the rows it handed over: the answer to the export, should it be re-sent
                self.journal.remember_export(request[0], request[1], name, _records(*f[2:6], *widths))
        elif kind == "import":
            store.import_rows(_records(*f[1:5], *widths))
            self.homes.arrive(name, _ids(f[0]), f[5])
        elif kind == "part":
            step, client, contributors, lr, ids, grads = f
            self.parts.add_part(name, step, client, contributors, lr, _ids(ids), _matrix(grads, widths[0]))
        elif kind == "vote":
            step, client = f
            self.parts.vote(name, step, client)
        elif kind == "parts_done":
            self.parts.forget(name, f[0])
        elif kind == "parts_expired":
            self.parts.expire_step(name, f[0])
        else:
            raise WalCorrupt(f"unknown write-ahead log change {kind!r} of table {name!r}")


def _widths(store: TableStore) -> tuple[int, int]:
    """(row width, optimizer-state width) of the table's records."""
    return store.cfg.stored_width, store.optimizer.state_width(store.cfg.stored_width)


def _ids(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.int64).copy()


def _matrix(raw: bytes, width: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32).reshape(-1, width).copy()


def _records(ids: bytes, rows: bytes, state: bytes, last: bytes, width: int, state_width: int) -> RowRecords:
    ids = _ids(ids)
    return RowRecords(ids, _matrix(rows, width), np.frombuffer(state, np.float32).reshape(len(ids), state_width).copy(),
                      _ids(last))
