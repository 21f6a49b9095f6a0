"""StepParts: the data-parallel parts of a step a shard holds until every worker sent its own.

K data-parallel workers push their parts of one table step separately (`contributors=K`). The
shard holds the parts here and applies their sum once, as one worker with the whole batch would
(the optimizer's update is non-linear, so K updates of the parts would differ). A step is
complete when K distinct workers sent their part in a push that commits (`is_complete`), or,
when pushes do not commit (a worker may send several requests of its part, rows having moved
under it), when K distinct workers committed it (`vote`). `take` then hands the summed part over.

`Shard` assembles steps through these methods and `Recovery` puts the parts and votes back
through the same ones: what a checkpoint stored (`held`, `voters`; `hold`, `vote`) and the write-
ahead log's part, vote and parts_done records (`add_part`, `vote`, `forget`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from memory_service.errors import InvalidArgument
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


class StepParts:
    """The parts held and the commits counted of each (table, step) that is not complete yet."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], Parts] = {}  # (table, step) -> parts held so far
        self._votes: dict[tuple[str, int], set[str]] = {}  # (table, step) -> clients that committed it

    def check_part(self, name: str, step: int, client_id: str, contributors: int, lr: float | None,
                   is_whole: bool) -> None:
        """InvalidArgument unless a part of table `name`'s step `step` agrees with the parts held:
        the same contributors and lr, and with `is_whole` (the client's whole part in a push that
        commits) none from `client_id` yet."""
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
        parts.clients.add(client_id)
        parts.ids.append(ids)
        parts.grads.append(grads)

    def is_complete(self, name: str, step: int) -> bool:
        """Whether every contributor sent its part of table `name`'s step."""
        parts = self._parts.get((name, step))
        return parts is not None and len(parts.clients) == parts.contributors

    def check_vote(self, name: str, step: int, client_id: str) -> None:
        """InvalidArgument if `client_id` committed table `name`'s step already."""
        if client_id in self._votes.get((name, step), ()):
            raise InvalidArgument(f"table {name!r} step {step}: client {client_id!r} already committed")

    def vote(self, name: str, step: int, client_id: str) -> int:
        """Counts `client_id`'s commit of table `name`'s step; returns the clients that committed it."""
        votes = self._votes.setdefault((name, step), set())
        votes.add(client_id)
        return len(votes)

    def take(self, name: str, step: int) -> TablePush | None:
        """Removes the parts held of table `name`'s step and returns their sum: distinct ids (m,)
        sorted, summed grads (m, width), the parts' lr. None when no part is held."""
        parts = self._parts.pop((name, step), None)
        if parts is None:
            return None
        ids, grads = sum_duplicates(np.concatenate(parts.ids), np.concatenate(parts.grads))
        return TablePush(step, ids, grads, parts.lr)

    def forget(self, name: str, step: int) -> None:
        """Forgets the parts and commits of table `name`'s step: it is done."""
        self._parts.pop((name, step), None)
        self._votes.pop((name, step), None)

    def drop_table(self, name: str) -> None:
        self._parts = {key: parts for key, parts in self._parts.items() if key[0] != name}
        self._votes = {key: votes for key, votes in self._votes.items() if key[0] != name}

    # -- what a checkpoint stores ---------------------------------------------------------------
    def held(self) -> Iterator[tuple[str, int, Parts]]:
        """(table, step, parts) of every step with parts held."""
        return ((name, step, parts) for (name, step), parts in self._parts.items())

    def voters(self) -> Iterator[tuple[str, int, set[str]]]:
        """(table, step, clients that committed it) of every step with commits counted."""
        return ((name, step, votes) for (name, step), votes in self._votes.items())

    def hold(self, name: str, step: int, parts: Parts) -> None:
        """Puts back the parts `held` returned of table `name`'s step."""
        self._parts[(name, step)] = parts
