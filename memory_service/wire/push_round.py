"""PushRound: one round of a client's push on the wire.

A request per chunk of the routes carries the summed gradients of its distinct ids to their shard,
on the transport's push threads (pushes never queue behind fetches held for a later step). Each
request is applied later, at the step's commit (commit_later), and carries a request id the shard
applies once, so a re-sent request is safe. Requests a shard refused because their rows moved
(hot/cold migration) are handed back, with their ids and gradients, for the client to re-send.
"""
from __future__ import annotations

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
                 step: int, lr: float | None, contributors: int, trace: Callable[[str, dict], None] | None = None):
        self.transport, self.client_id, self.request_seqs, self.configs = transport, client_id, request_seqs, configs
        self.routes, self.summed = routes, summed
        self.step, self.lr, self.contributors, self.trace = step, lr, contributors, trace
        self.sent: list[tuple[Chunk, Future]] = []

    def send(self, requests: list[Request]) -> "PushRound":
        """Start every request [(shard, chunk)]; nothing waits here."""
        self.sent = [(chunk, self._send(shard, chunk)) for shard, chunk in requests]
        return self

    def gather(self) -> tuple[int, Refused]:
        """Wait for every reply: (rows updated, {table: [(ids, grads)]} of the requests refused
        because rows moved; empty when every request landed)."""
        updated, refused = 0, {}
        for chunk, future in self.sent:
            try:
                updated += self.transport.result(future).rows_updated
            except RowsMoved:
                for name, start, stop in chunk:
                    refused.setdefault(name, []).append(
                        (self.routes[name].grouped[start:stop], self.summed[name][start:stop]))
        return updated, refused

    def _send(self, shard: int, chunk: Chunk) -> Future:
        request = memory_pb2.PushRequest(client_id=self.client_id, contributors=self.contributors,
                                         commit_later=True, request_seq=next(self.request_seqs), tables=[
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
