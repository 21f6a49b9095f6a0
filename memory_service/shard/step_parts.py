"""StepParts: the data-parallel parts of a step a shard holds until every worker sent its own.

K data-parallel workers push their parts of one table step separately (`contributors=K`). The
shard holds the parts here and applies their sum once, as one worker with the whole batch would
(the optimizer's update is non-linear, so K updates of the parts would differ). A step is
complete when K distinct workers sent their part in a push that commits (`is_complete`), or,
when pushes do not commit (a worker may send several requests of its part, rows having moved
under it), when K distinct workers committed it (`vote`). `take` then hands the summed part over.

`Shard` assembles steps through these methods and `Recovery` puts the parts and votes back
through the same ones: what a checkpoint stored (`held`, `voters`, `expired`; `hold`, `vote`,
`expire_step`) and the write-ahead log's part, vote, parts_done and parts_expired records
(`add_part`, `vote`, `forget`, `expire_step`).

Bounds. What is held is a caller's to make, so it is bounded and expires (StorageConfig): the
parts' bytes (ids + gradients) per shard (`max_bytes`) and per client (`client_max_bytes`), and the
steps open at once (MAX_OPEN_STEPS); `check_room` refuses a part past any of them with LimitReached
(RESOURCE_EXHAUSTED) before anything is held; a whole part that completes its step is applied at
once, never held, so it is not refused. A step whose parts or commits did not all come within
`expiry_s` of its first is `due`; the shard drops it (`expire_step`) at its next request or
placement pass and logs that, so a replay drops it too; and
what a trainer sees then is StepExpired (FAILED_PRECONDITION) on its next part or commit of that
step, which is never applied on this shard (fetches waiting for it time out): it must redo the
step or restore a checkpoint. The last MAX_EXPIRED expired steps are remembered for that answer.
Parts put back by recovery count their time from the reopen.
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from memory_service.errors import InvalidArgument, LimitReached, StepExpired
from memory_service.shard.request_checks import sum_duplicates
from memory_service.tables import TablePush


@dataclass
class Parts:
    """The parts of one (table, step) pushed so far by data-parallel workers."""

    contributors: int
    lr: float | None
    clients: set[str] = dataclasses.field(default_factory=set)
    ids: list[np.ndarray] = dataclasses.field(default_factory=list)  # each (n_i,) int64
    grads: list[np.ndarray] = dataclasses.field(default_factory=list)  # each (n_i, width) float32
    client_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # client -> bytes of its parts


MAX_OPEN_STEPS = 4096  # (table, step)s with parts or commits held at once, per shard
MAX_EXPIRED = 4096  # expired (table, step)s remembered, to answer their late parts with StepExpired


class StepParts:
    """The parts held and the commits counted of each (table, step) that is not complete yet,
    within `max_bytes` of parts per shard and `client_max_bytes` per client, each step for at most
    `expiry_s` seconds."""

    def __init__(self, max_bytes: int = 2 << 30, client_max_bytes: int = 512 << 20,
                 expiry_s: float = 300.0) -> None:
        self.max_bytes, self.client_max_bytes, self.expiry_s = max_bytes, client_max_bytes, expiry_s
        self._parts: dict[tuple[str, int], Parts] = {}  # (table, step) -> parts held so far
        self._votes: dict[tuple[str, int], set[str]] = {}  # (table, step) -> clients that committed it
        self._opened: dict[tuple[str, int], float] = {}  # open (table, step) -> monotonic time of its first part
        self._expired: OrderedDict[tuple[str, int], None] = OrderedDict()  # the last MAX_EXPIRED dropped
        self.nbytes = 0  # bytes of every part held
        self._client_bytes: dict[str, int] = {}  # client -> bytes of its parts held

    def __len__(self) -> int:
        """(table, step)s open: with parts or commits held."""
        return len(self._opened)

    def client_nbytes(self, client_id: str) -> int:
        """Bytes of the parts `client_id` has held here."""
        return self._client_bytes.get(client_id, 0)

    def check_room(self, client_id: str, nbytes: int, keys: list[tuple[str, int]]) -> None:
        """LimitReached unless `client_id` may hold `nbytes` more of parts of the (table, step)s
        `keys`: the shard's and the client's byte bounds, and the open steps' count."""
        new_steps = len({key for key in keys if key not in self._opened})
        if len(self._opened) + new_steps > MAX_OPEN_STEPS:
            raise LimitReached(f"{len(self._opened)} data-parallel steps are open on this shard (at most "
                               f"{MAX_OPEN_STEPS}): complete some before opening more")
        if self.nbytes + nbytes > self.max_bytes:
            raise LimitReached(f"data-parallel parts of {nbytes} bytes would make the parts held on this shard "
                               f"{self.nbytes + nbytes} bytes, over parts_max_bytes {self.max_bytes}: complete "
                               f"the steps held (or wait {self.expiry_s:g} s for them to expire)")
        held = self.client_nbytes(client_id)
        if held + nbytes > self.client_max_bytes:
            raise LimitReached(f"client {client_id!r}: data-parallel parts of {nbytes} bytes beside the {held} "
                               f"it holds are over parts_client_max_bytes {self.client_max_bytes}: complete its "
                               f"steps first")

    def check_part(self, name: str, step: int, client_id: str, contributors: int, lr: float | None,
                   is_whole: bool) -> None:
        """InvalidArgument unless a part of table `name`'s step `step` agrees with the parts held:
        the same contributors and lr, and with `is_whole` (the client's whole part in a push that
        commits) none from `client_id` yet; StepExpired if the step's parts expired."""
        self._check_not_expired(name, step)
        parts = self._parts.get((name, step))
        if parts is None:
            return
        if parts.contributors != contributors:
            raise InvalidArgument(f"table {name!r} step {step}: {contributors} contributors, but "
                                  f"earlier parts said {parts.contributors}")
        if parts.lr != lr:
            raise InvalidArgument(f"table {name!r} step {step}: lr {lr} differs from "
                                  f"the earlier parts' {parts.lr}")
        if is_whole and client_id in parts.clients:
            raise InvalidArgument(f"table {name!r} step {step}: client {client_id!r} already sent its part")

    def add_part(self, name: str, step: int, client_id: str, contributors: int, lr: float | None,
                 ids: np.ndarray, grads: np.ndarray) -> None:
        """Holds `client_id`'s part of table `name`'s step: ids (n,) int64, grads (n, width) f32."""
        parts = self._parts.setdefault((name, step), Parts(contributors, lr))
        self._opened.setdefault((name, step), time.monotonic())
        parts.clients.add(client_id)
        parts.ids.append(ids)
        parts.grads.append(grads)
        nbytes = ids.nbytes + grads.nbytes
        parts.client_bytes[client_id] = parts.client_bytes.get(client_id, 0) + nbytes
        self._count(Parts(contributors, lr, client_bytes={client_id: nbytes}), +1)

    def completes(self, name: str, step: int, client_id: str, contributors: int) -> bool:
        """Whether a whole part from `client_id` would complete table `name`'s step (it is then
        summed and applied at once, never held: the bounds do not count it)."""
        parts = self._parts.get((name, step))
        return len((parts.clients if parts is not None else set()) | {client_id}) == contributors

    def is_complete(self, name: str, step: int) -> bool:
        """Whether every contributor sent its part of table `name`'s step."""
        parts = self._parts.get((name, step))
        return parts is not None and len(parts.clients) == parts.contributors

    def check_vote(self, name: str, step: int, client_id: str) -> None:
        """InvalidArgument if `client_id` committed table `name`'s step already; StepExpired if
        the step's parts expired; LimitReached if it would open a step past MAX_OPEN_STEPS."""
        self._check_not_expired(name, step)
        if (name, step) not in self._opened and len(self._opened) >= MAX_OPEN_STEPS:
            raise LimitReached(f"{len(self._opened)} data-parallel steps are open on this shard (at most "
                               f"{MAX_OPEN_STEPS}): complete some before opening more")
        if client_id in self._votes.get((name, step), ()):
            raise InvalidArgument(f"table {name!r} step {step}: client {client_id!r} already committed")

    def vote(self, name: str, step: int, client_id: str) -> int:
        """Counts `client_id`'s commit of table `name`'s step; returns the clients that committed it."""
        votes = self._votes.setdefault((name, step), set())
        self._opened.setdefault((name, step), time.monotonic())
        votes.add(client_id)
        return len(votes)

    def take(self, name: str, step: int) -> TablePush | None:
        """Removes the parts held of table `name`'s step and returns their sum: distinct ids (m,)
        sorted, summed grads (m, width), the parts' lr. None when no part is held."""
        parts = self._parts.pop((name, step), None)
        if (name, step) not in self._votes:
            self._opened.pop((name, step), None)
        if parts is None:
            return None
        self._count(parts, -1)
        ids, grads = sum_duplicates(np.concatenate(parts.ids), np.concatenate(parts.grads))
        return TablePush(step, ids, grads, parts.lr)

    def forget(self, name: str, step: int) -> None:
        """Forgets the parts and commits of table `name`'s step: it is done."""
        if (parts := self._parts.pop((name, step), None)) is not None:
            self._count(parts, -1)
        self._votes.pop((name, step), None)
        self._opened.pop((name, step), None)

    def drop_table(self, name: str) -> None:
        for key in [key for key in self._opened if key[0] == name]:
            self.forget(*key)
        for key in [key for key in self._expired if key[0] == name]:
            del self._expired[key]

    # -- expiry -----------------------------------------------------------------------------------
    def due(self, now: float | None = None) -> list[tuple[str, int]]:
        """The open (table, step)s older than `expiry_s` at `now` (monotonic; None: now), oldest first."""
        limit = (time.monotonic() if now is None else now) - self.expiry_s
        due = []
        for key, opened in self._opened.items():  # in the order they opened, so oldest first
            if opened > limit:
                break
            due.append(key)
        return due

    def expire_step(self, name: str, step: int) -> None:
        """Drops table `name`'s step: its parts and commits are forgotten, and its later parts and
        commits get StepExpired."""
        self.forget(name, step)
        self._expired[(name, step)] = None
        while len(self._expired) > MAX_EXPIRED:
            self._expired.popitem(last=False)

    def expired(self) -> list[tuple[str, int]]:
        """The expired (table, step)s remembered, oldest first."""
        return list(self._expired)

    def _check_not_expired(self, name: str, step: int) -> None:
        if (name, step) in self._expired:
            raise StepExpired(f"table {name!r} step {step}: its data-parallel parts expired (not every contributor's "
                              f"part and commit came within parts_expiry_s {self.expiry_s:g} s of the first), so "
                              f"the step was dropped unapplied on this shard: redo the step or restore a checkpoint")

    def _count(self, parts: Parts, sign: int) -> None:
        """Adds (+1) or removes (-1) the bytes of `parts` to the shard's and its clients' totals."""
        for client, nbytes in parts.client_bytes.items():
            self.nbytes += sign * nbytes
            left = self._client_bytes.get(client, 0) + sign * nbytes
            if left:
                self._client_bytes[client] = left
            else:
                self._client_bytes.pop(client, None)

    # -- what a checkpoint stores ---------------------------------------------------------------
    def held(self) -> Iterator[tuple[str, int, Parts]]:
        """(table, step, parts) of every step with parts held."""
        return ((name, step, parts) for (name, step), parts in self._parts.items())

    def voters(self) -> Iterator[tuple[str, int, set[str]]]:
        """(table, step, clients that committed it) of every step with commits counted."""
        return ((name, step, votes) for (name, step), votes in self._votes.items())

    def hold(self, name: str, step: int, parts: Parts) -> None:
        """Puts back the parts `held` returned of table `name`'s step (their bytes counted per
        client from the parts' `client_bytes`, or split evenly between the clients when empty)."""
        if not parts.client_bytes and parts.clients:
            total = sum(i.nbytes for i in parts.ids) + sum(g.nbytes for g in parts.grads)
            share, clients = total // len(parts.clients), sorted(parts.clients)
            parts.client_bytes = {c: share for c in clients}
            parts.client_bytes[clients[0]] += total - share * len(clients)
        if (before := self._parts.get((name, step))) is not None:
            self._count(before, -1)
        self._parts[(name, step)] = parts
        self._opened.setdefault((name, step), time.monotonic())
        self._count(parts, +1)
