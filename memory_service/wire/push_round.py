"""PushRound: one round of a client's push on the wire.

A request per chunk of the routes carries the summed gradients of its distinct ids to their shard,
on the transport's push threads (pushes never queue behind fetches held for a later step). Each
request carries a request id the shard applies once, so a re-sent request is safe. Requests are
applied later, at the step's commit (commit_later), unless the round commits the step itself:
where rows cannot move (no hot shards) and each shard gets the whole step in one request
(`whole_step_requests`), the commit rides on that request and the step costs one request per
shard. Each shard's first request may carry the announcement of a later fetch's ids (placement's
look-ahead) instead of an Announce of its own. Requests a shard refused because their rows moved
(hot/cold migration) are handed back, with their ids and gradients (and any announcement they
carried), for the client to re-send.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

from memory_service.config import TableConfig
from memory_service.errors import InvalidArgument, RowsMoved
from memory_service.router import Chunk, Request, Route
from memory_service.rpc import memory_pb2
from memory_service.wire import codec
from memory_service.wire.transport import Transport

Refused = dict[str, list[tuple[np.ndarray, np.ndarray]]]  # table -> [(ids (k,), grads (k, width))]


class PushRound:
    """The gradients `summed` {table: (u, width) float32} of `routes`' distinct ids as table step
    `step` with learning rate `lr` (None: the tables' own), one of `contributors` parts of the
    step. `configs` are the tables' configs, `request_seqs` the client's request ids,
    `trace(event, fields)` is told of each request sent."""

    def __init__(self, transport: Transport, client_id: str, request_seqs: Iterator[int],
                 configs: dict[str, TableConfig], routes: dict[str, Route], summed: dict[str, np.ndarray],
                 step: int, lr: float | None, contributors: int, trace: Callable[[str, dict], None] | None = None,
                 commit_later: bool = True):
        self.transport, self.client_id, self.request_seqs, self.configs = transport, client_id, request_seqs, configs
        self.routes, self.summed = routes, summed
        self.step, self.lr, self.contributors, self.trace = step, lr, contributors, trace
        self.commit_later = commit_later
        self.sent: list[tuple[int, Chunk, Future, memory_pb2.AnnounceRequest | None]] = []
        self.unannounced: list[tuple[int, memory_pb2.AnnounceRequest]] = []  # refused with their push

    def send(self, requests: list[Request],
             announcements: dict[int, memory_pb2.AnnounceRequest] | None = None) -> "PushRound":
        """Start every request [(shard, chunk)], the first of each shard carrying its entry of
        `announcements` {shard: AnnounceRequest}; nothing waits here."""
        riding = dict(announcements or {})
        for shard, chunk in requests:
            announce = riding.pop(shard, None)
            self.sent.append((shard, chunk, self._send(shard, chunk, announce), announce))
        return self

    def gather(self) -> tuple[int, Refused]:
        """Wait for every reply: (rows updated, {table: [(ids, grads)]} of the requests refused
        because rows moved; empty when every request landed). The announcements those requests
        carried are left in `unannounced`, for the client to send alone."""
        updated, refused = 0, {}
        for shard, chunk, future, announce in self.sent:
            try:
                updated += self.transport.result(future).rows_updated
            except RowsMoved:
                if announce is not None:
                    self.unannounced.append((shard, announce))
                for name, start, stop in chunk:
                    refused.setdefault(name, []).append(
                        (self.routes[name].grouped[start:stop], self.summed[name][start:stop]))
        return updated, refused

    def _send(self, shard: int, chunk: Chunk, announce: memory_pb2.AnnounceRequest | None) -> Future:
        request = memory_pb2.PushRequest(client_id=self.client_id, contributors=self.contributors,
                                         commit_later=self.commit_later, request_seq=next(self.request_seqs),
                                         announce=announce, tables=[
            self._grads_message(name, self.routes[name].grouped[start:stop], self.summed[name][start:stop])
            for name, start, stop in chunk])
        if self.trace is not None:
            self.trace("push_sent", {"shard": shard, "step": self.step})
        return self.transport.start(shard, "Push", request, self.transport.push_pool)

    def _grads_message(self, name: str, ids: np.ndarray, grads: np.ndarray) -> memory_pb2.TableGrads:
        """ids (k,), grads (k, width) of table `name` as its part of a PushRequest."""
        cfg = self.configs[name]
        if grads.shape[1] != cfg.width:
            raise InvalidArgument(f"table {name!r}: gradient width {grads.shape[1]} != table width {cfg.width}")
        return memory_pb2.TableGrads(table=name, step=self.step, dtype=codec.dtype_to_proto(cfg.dtype),
                                     width=cfg.width, ids=codec.encode_ids(ids),
                                     grads=codec.encode_rows(grads, cfg.dtype), **codec.lr_field(self.lr))


def whole_step_requests(routes: dict[str, Route], requests: list[Request], num_shards: int) -> list[Request] | None:
    """One request per shard holding every table of `routes` (a table with no rows there as an
    empty slice: it still records the step on that shard), when `requests` (the routes cut to the
    wire's limits) put at most one request on each shard; None when some shard needs several (its
    step must then be committed once all of them landed)."""
    shards = [shard for shard, _ in requests]
    if len(shards) != len(set(shards)):
        return None
    return [(shard, [(name, int(route.bounds[shard]), int(route.bounds[shard + 1])) for name, route in routes.items()])
            for shard in range(num_shards)]


def riding_announcements(announcements: list[tuple[int, memory_pb2.AnnounceRequest]], requests: list[Request]
                         ) -> tuple[dict[int, memory_pb2.AnnounceRequest], list[tuple[int, memory_pb2.AnnounceRequest]]]:
    """An announcement routed [(shard, AnnounceRequest)] split into ({shard: its AnnounceRequest}
    to ride on that shard's push `requests`, [(shard, AnnounceRequest)] to send alone: shards the
    push sends nothing to, or whose part of the announcement needs several requests)."""
    pushed = {shard for shard, _ in requests}
    counts = Counter(shard for shard, _ in announcements)
    riding = {shard: request for shard, request in announcements if shard in pushed and counts[shard] == 1}
    return riding, [(shard, request) for shard, request in announcements if shard not in riding]
