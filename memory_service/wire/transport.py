"""Transport: the client's gRPC side of a tables cluster.

One channel and stub per shard, rpcs run on the transport's thread pools, re-sent while a shard
is unavailable (memory_service/wire/retry.py), and the shards' status codes turned back into the
service's exceptions (memory_service/errors.py: the servicer maps each to one code). It knows
nothing of tables or rows: MemoryClient builds the messages and reads the replies.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NoReturn

import grpc

from memory_service.errors import error_of_status
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.wire.codec import MESSAGE_OPTIONS
from memory_service.wire.fetch_reply import FetchReply
from memory_service.wire.retry import RECONNECT_OPTIONS, RetryPolicy
from memory_service.wire.security import ClientSecurity, open_channel

# A held fetch (min_step) that a shard answered DEADLINE_EXCEEDED with at least this much of the
# client's timeout left ended at the shard's own bound (server.budgets.MAX_FETCH_WAIT_S, seconds),
# not at ours: it is sent again for the rest of the client's timeout.
HELD_RESEND_MARGIN_S = 0.5
FETCH_METHOD = "/engram_memory.v1.MemoryService/Fetch"


def raise_error(err: grpc.RpcError) -> NoReturn:
    """Raise the service error of `err`'s status (memory_service.errors.STATUS_ERRORS: a named
    class for every code)."""
    raise error_of_status(err.code().name, err.details() or "") from None


class Transport:
    """Channels to `targets` in shard order: the `num_cold` cold shards, then the hot ones.
    `timeout` bounds each rpc; `retry` how long a shard may stay unreachable (ShardUnavailable
    after); `security` the TLS and bearer token of secured shards (None: plain channels)."""

    def __init__(self, targets: list[str], num_cold: int, timeout: float, retry: RetryPolicy,
                 security: ClientSecurity | None = None):
        self.targets, self.num_cold = list(targets), num_cold
        self.timeout, self.retry = timeout, retry
        self.channels = [open_channel(t, (*MESSAGE_OPTIONS, *RECONNECT_OPTIONS), security) for t in self.targets]
        self.stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in self.channels]
        # Fetch replies read as FetchReply (rows left in the received bytes), not parsed by protobuf
        self.fetch_calls = [c.unary_unary(FETCH_METHOD, request_serializer=memory_pb2.FetchRequest.SerializeToString,
                                          response_deserializer=FetchReply.parse) for c in self.channels]
        self.retries = 0  # rpcs re-sent because a shard was unavailable
        self.sent: Counter[str] = Counter()  # rpcs sent, by rpc name (re-sends not counted): a step's requests
        self._retries_lock = threading.Lock()
        # rpcs get threads of their own: a fetch_async on the client's pool waits on its rpcs,
        # and a fetch held at a shard for a later step must leave threads for the push that releases it
        self.rpc_pool = ThreadPoolExecutor(max_workers=max(8, 4 * len(self.targets)), thread_name_prefix="memory-rpc")
        # pushes and commits never queue behind fetches: a fetch held for step s waits for the
        # commit of s, so sharing threads with held fetches could starve that commit
        self.push_pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.targets)), thread_name_prefix="memory-push")

    @property
    def num_shards(self) -> int:
        return len(self.stubs)

    def start(self, shard: int, rpc: str, request, pool: ThreadPoolExecutor | None = None) -> Future:
        """Start rpc `rpc` to `shard` on the rpc threads (or `pool`); the Future raises
        grpc.RpcError (see `result`). (grpc's own `.future()` starts a thread per call: ~0.4 ms
        each here, a quarter of a small fetch.)"""
        return (pool or self.rpc_pool).submit(self.send, shard, rpc, request)

    def send(self, shard: int, rpc: str, request):
        """rpc `rpc` to `shard` in this thread, re-sent while the shard is unavailable; other
        failures raise grpc.RpcError. A held fetch (a Fetch with a min_step) waits up to the
        client's timeout in all: a shard holds one for seconds at most, so it is sent again when
        the shard's bound ended it before ours."""
        method = self.fetch_calls[shard] if rpc == "Fetch" else getattr(self.stubs[shard], rpc)
        name = f"{rpc} to {self.shard_name(shard)}"
        with self._retries_lock:
            self.sent[rpc] += 1
        if rpc != "Fetch" or request.min_step <= 0:
            return self.retry.call(lambda: method(request, timeout=self.timeout), name, self._count_retry)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.retry.call(lambda: method(request, timeout=max(0.001, deadline - time.monotonic())),
                                       name, self._count_retry)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED or \
                        deadline - time.monotonic() < HELD_RESEND_MARGIN_S:
                    raise

    def call(self, shard: int, rpc: str, request):
        """`send`, with a failure raised as the service error of its status."""
        try:
            return self.send(shard, rpc, request)
        except grpc.RpcError as err:
            raise_error(err)

    @staticmethod
    def result(future: Future):
        """The reply of a started rpc, or the service error of its status."""
        try:
            return future.result()
        except grpc.RpcError as err:
            raise_error(err)

    def call_all(self, rpc: str, request, shards=None, pool: ThreadPoolExecutor | None = None) -> list:
        """rpc `rpc` with `request` to every shard (or `shards`), concurrently on the rpc threads
        (or `pool`); replies in order."""
        futures = [self.start(shard, rpc, request, pool)
                   for shard in (range(self.num_shards) if shards is None else shards)]
        return [self.result(f) for f in futures]

    def shard_name(self, shard: int) -> str:
        """"cold shard 1 at host:port", as errors name it."""
        kind, index = ("cold", shard) if shard < self.num_cold else ("hot", shard - self.num_cold)
        return f"{kind} shard {index} at {self.targets[shard]}"

    def _count_retry(self) -> None:
        with self._retries_lock:
            self.retries += 1

    def close(self) -> None:
        self.rpc_pool.shutdown(wait=False)
        self.push_pool.shutdown(wait=False)
        for channel in self.channels:
            channel.close()
