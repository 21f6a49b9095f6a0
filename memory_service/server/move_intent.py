"""MoveIntent: the move a durable hot shard's migrator has in flight, kept in a file of its directory.

A move takes rows out of one shard and puts them into another in two requests (migration.py). Each
shard logs its own half (memory_service/durability/journal.py), but a hot shard killed between the
halves would lose the rows in flight: the export is logged, the import never happens. So before a
move starts, the migrator writes what it is about to do here (which rows, which way, and the
request id of its export), and removes the file once both halves are done. A migrator that starts
over a directory holding one finishes that move first (`Migrator.resume`): the export, re-sent with
its request id, returns the rows it handed over the first time (each shard remembers them), and an
import leaves rows that already arrived as they are, so finishing a move twice changes nothing.

The file is replaced atomically (write, then rename); like the write-ahead log it is handed to the
OS, which a killed process cannot lose, and synced to disk only with `fsync`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import msgpack
import numpy as np

FILE_NAME = "move-in-flight"


@dataclass(frozen=True)
class Move:
    """One move: `kind` "promote" (cold -> hot) or "demote" (hot -> cold) of rows `ids` of table
    `table`, at hot map `version`; its export is request (`client_id`, `request_seq`)."""

    kind: str
    table: str
    ids: np.ndarray
    version: int
    client_id: str
    request_seq: int


class MoveIntent:
    """The file `directory`/move-in-flight: the move in progress, or none."""

    def __init__(self, directory: str, fsync: bool = False) -> None:
        self.path, self.fsync = os.path.join(directory, FILE_NAME), fsync

    def begin(self, move: Move) -> None:
        """Records `move` before any of it happens (replacing the last one, which is done)."""
        raw = msgpack.packb([move.kind, move.table, np.ascontiguousarray(move.ids, np.int64).tobytes(),
                             move.version, move.client_id, move.request_seq], use_bin_type=True)
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def end(self) -> None:
        """Both halves of the move are done."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def pending(self) -> Move | None:
        """The move a crash interrupted, or None."""
        try:
            with open(self.path, "rb") as f:
                kind, table, ids, version, client_id, seq = msgpack.unpackb(f.read(), raw=False)
        except FileNotFoundError:
            return None
        return Move(kind, table, np.frombuffer(ids, np.int64).copy(), version, client_id, seq)
