"""FetchRound: one round of a client's fetch on the wire.

A request per chunk of the routes goes to its shard; the replies are then placed in the fetch's
ReplyLayout. Rows come through the layout's shared memory from the shards on this host: a shard
that cannot open the file (it runs on another host) is asked again over gRPC and marked in
`same_host` (the client's list) so later rounds ask it over gRPC at once. Requests a shard refused
because their rows moved (hot/cold migration) are handed back for the client to re-send.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

import grpc
import numpy as np

from memory_service.errors import RowsMoved
from memory_service.ops.collisions import NgramBatch
from memory_service.router import Chunk, Request, Route
from memory_service.rpc import memory_pb2
from memory_service.wire import codec
from memory_service.wire.direct_reads import DirectReads
from memory_service.wire.reply_layout import ReplyLayout
from memory_service.wire.transport import Transport, raise_error


class FetchRound:
    """The requests of `routes` {table: Route} as of table step `min_step`, with the N-grams
    `ngrams` {table: NgramBatch of its route's distinct ids} where collision stats are on, their
    rows to land in `layout`. `started`: perf_counter when the fetch began (rounds that re-send
    keep the first round's); `trace(event, fields)` is told of each request sent."""

    def __init__(self, transport: Transport, routes: dict[str, Route], ngrams: dict[str, NgramBatch],
                 layout: ReplyLayout, min_step: int, same_host: list[bool],
                 trace: Callable[[str, dict], None] | None = None, started: float | None = None,
                 direct: DirectReads | None = None):
        self.transport, self.routes, self.ngrams, self.layout = transport, routes, ngrams, layout
        self.min_step, self.same_host, self.trace = min_step, same_host, trace
        self.direct = direct  # same-host reads from the shards' shared arenas, tried first
        self.started = time.perf_counter() if started is None else started
        self.sent: list[tuple[int, Chunk, tuple[Future, bool]]] = []  # (shard, chunk, (future, via_shm))

    def send(self, requests: list[Request]) -> "FetchRound":
        """Start every request [(shard, chunk)]; nothing waits here. The layout is released if
        a request cannot be sent."""
        try:
            self.sent = [(shard, chunk, self._send(shard, chunk)) for shard, chunk in requests
                         if not self._read_direct(shard, chunk)]
        except BaseException:
            self.layout.release()
            raise
        return self

    def gather(self) -> dict[str, np.ndarray]:
        """Wait for every reply and place its rows in the layout (`layout.rows`); returns
        {table: positions in its route's distinct ids} of the requests refused because rows
        moved (empty: every row is in)."""
        moved: dict[str, list[np.ndarray]] = {}
        for shard, chunk, sent in self.sent:
            try:
                response, via_shm = self._result(shard, chunk, sent)
            except RowsMoved:
                for name, start, stop in chunk:
                    moved.setdefault(name, []).append(np.arange(start, stop))
                continue
            for (name, _, _), rows in zip(chunk, response.tables):
                codec.check_reply_dtype(self.layout.configs[name], rows)
            if not via_shm:  # shared-memory replies are in place already
                self.layout.place(chunk, response)
        return {name: np.concatenate(parts) for name, parts in moved.items()}

    def _send(self, shard: int, chunk: Chunk, shared: bool = True) -> tuple[Future, bool]:
        """Start request `chunk` to `shard`, its rows to come through the layout's shared memory
        where there is some, `shared` allows and the shard shares this host; (future, whether
        they do)."""
        use_shm = shared and self.layout.path is not None and self.same_host[shard]
        request = memory_pb2.FetchRequest(tables=[
            memory_pb2.TableIds(table=name, ids=codec.encode_ids(self.routes[name].grouped[start:stop]),
                                reply_offset=self.layout.offset(name, start) if use_shm else 0,
                                ngrams=self._ngrams_message(name, start, stop))
            for name, start, stop in chunk
        ], shared_memory=memory_pb2.SharedMemoryReply(path=self.layout.path) if use_shm else None,
            min_step=self.min_step)
        if self.trace is not None:
            self.trace("fetch_sent", {"shard": shard, "step": self.min_step})
        return self.transport.start(shard, "Fetch", request), use_shm

    def _read_direct(self, shard: int, chunk: Chunk) -> bool:
        """Whether request `chunk`'s rows were read from `shard`'s shared arena into the layout
        (never for N-grams, which only a Fetch carries to the shard's collision stats)."""
        if self.direct is None or any(name in self.ngrams for name, _, _ in chunk):
            return False
        items = [(self.layout.configs[name], np.ascontiguousarray(self.routes[name].grouped[start:stop], dtype=np.int64),
                  self.layout.rows[name][start:stop]) for name, start, stop in chunk]
        if not self.direct.read(shard, items, self.min_step):
            return False
        if self.trace is not None:
            self.trace("fetch_sent", {"shard": shard, "step": self.min_step, "direct": True})
        return True

    def _ngrams_message(self, name: str, start: int, stop: int):
        return codec.encode_ngrams(self.ngrams[name].slice(start, stop)) if name in self.ngrams else None

    def _result(self, shard: int, chunk: Chunk, sent: tuple[Future, bool]):
        """(response, whether rows came through shared memory); asks again over gRPC alone if
        the shard cannot open the reply file (it runs on another host)."""
        future, use_shm = sent
        try:
            return future.result(), use_shm
        except grpc.RpcError as err:
            if not use_shm or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise_error(err)
        self.same_host[shard] = False
        future, _ = self._send(shard, chunk, shared=False)
        return self.transport.result(future), False
