"""Admission: who may call a shard, and how many calls each caller may have in flight or held.

The shard's gRPC server is a grpc.aio server (servicer.serve): requests are received on its event
loop, and only a complete, admitted request reaches a thread. `Admission`, its one interceptor,
decides from a call's headers alone, before any of its body is read and before any thread is
held:

- the token (wire.security.TokenCheck): a call without a valid token is refused at once
  (UNAUTHENTICATED / PERMISSION_DENIED) by a handler that never reads its body, so uploads that
  never finish cost no thread and no wait (issue 22, finding 2);
- the call bounds (`AdmissionLimits`): calls in flight per client and in all, counted from the
  headers until the call ends, stalled uploads included; over a bound the call is refused with
  RESOURCE_EXHAUSTED (errors.Overloaded). A request body must arrive within `body_timeout_s`.

Then the request bytes are parsed (request_guard: INVALID_ARGUMENT for bytes that are not a valid
message), a token scoped to namespaces is checked against the tables the request names
(namespace_check: PERMISSION_DENIED, before any state is read or changed) and the servicer's method runs on the server's worker pool, except a small plain fetch
(at most `inline_ids` ids, no min_step), which runs on the event loop itself: its work is a
fraction of the two thread hand-offs (loop -> worker -> loop) it would otherwise wait for, and
since the shard serialises its requests under one lock, a loop waiting there delays nothing that
could run meanwhile but the reading of other calls' bytes. A held fetch (a Fetch with a
min_step) counts against its own bounds and waits on a pool of its own, so held fetches never take
the threads other calls need (finding 3); when its client cancels or disconnects, the call's
callbacks run (the servicer's wakes the shard's wait) and its places are given back once its thread
is free. A client is the pair (peer host, token): callers sharing a host and a token share bounds.
"""
from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
from grpc import aio

from memory_service.errors import Overloaded, status_details
from memory_service.server import namespace_check
from memory_service.server.request_guard import Unparsable, parse
from memory_service.wire.security import MEMORY_SERVICE, OPEN_CALLER, Caller, TokenCheck

HELD_METHOD = f"/{MEMORY_SERVICE}/Fetch"  # its requests with a min_step > 0 are held fetches
INLINE_METHOD = HELD_METHOD  # its small requests without a min_step run on the event loop


@dataclass(frozen=True)
class AdmissionLimits:
    """A shard server's bounds on its callers' calls. `calls_per_client`, `calls`: calls in flight
    (from their headers until they end, stalled uploads included) per client and in all.
    `held_per_client`, `held`: fetches waiting for a min_step, per client and in all (`held` is
    also the size of their own thread pool). `body_timeout_s`: how long an admitted call's request
    may take to arrive. `inline_ids`: a Fetch of at most this many ids (all tables) and no
    min_step runs on the event loop instead of a worker thread (0: none does)."""

    calls_per_client: int = 64
    calls: int = 512
    held_per_client: int = 16
    held: int = 64
    body_timeout_s: float = 30.0
    inline_ids: int = 64

    def __post_init__(self) -> None:
        for name in ("calls_per_client", "calls", "held_per_client", "held"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"AdmissionLimits.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.calls_per_client > self.calls or self.held_per_client > self.held:
            raise ValueError("AdmissionLimits: a per-client bound above its total bound")
        if not isinstance(self.inline_ids, int) or self.inline_ids < 0:
            raise ValueError(f"AdmissionLimits.inline_ids must be an int >= 0, got {self.inline_ids!r}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"AdmissionLimits.body_timeout_s must be > 0, got {self.body_timeout_s!r}")


class Places:
    """Places in flight per client and in all; used on the server's event loop only."""

    def __init__(self, per_client: int, total: int, what: str) -> None:
        self.per_client, self.total, self.what = per_client, total, what
        self.taken: Counter = Counter()
        self.in_use = 0

    def take(self, client: tuple) -> None:
        """One place for `client`; Overloaded when it or the server has none left."""
        if self.in_use >= self.total:
            raise Overloaded(f"{Overloaded.PREFIX} the shard has {self.total} {self.what} in flight, its bound; "
                             f"retry later")
        if self.taken[client] >= self.per_client:
            raise Overloaded(f"{Overloaded.PREFIX} this client has {self.per_client} {self.what} in flight, "
                             f"its bound per client; retry later")
        self.taken[client] += 1
        self.in_use += 1

    def give(self, client: tuple) -> None:
        self.in_use -= 1
        self.taken[client] -= 1
        if not self.taken[client]:
            del self.taken[client]


class CallAborted(Exception):
    """Raised by SyncContext.abort in a worker thread; the event loop aborts the call with it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class SyncContext:
    """What a servicer method running on a worker thread sees of its call: the subset of
    grpc.ServicerContext the servicer uses (abort, time_remaining, add_callback, is_active,
    invocation_metadata, peer)."""

    def __init__(self, context: aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self._metadata = context.invocation_metadata()
        self._peer = context.peer()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ended = self._cancelled = False

    def abort(self, code: grpc.StatusCode, details: str = ""):
        raise CallAborted(code, details)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Runs `callback` when the call is cancelled (its client went away or its deadline
        passed) while its method runs, at once if it was already; False (not added) once the
        call has ended."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
            cancelled = self._cancelled
        if cancelled:
            callback()
        return False

    def is_active(self) -> bool:
        return not self._ended

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def end(self, cancelled: bool) -> None:
        """The call ended; run the callbacks when it was cancelled."""
        with self._lock:
            self._ended, self._cancelled, callbacks = True, cancelled, self._callbacks
            self._callbacks = []
        for callback in callbacks if cancelled else ():
            callback()


def _client_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' -> 'ipv4:127.0.0.1' (a client's connections share its host)."""
    return peer.rpartition(":")[0] or peer


class Admission(aio.ServerInterceptor):
    """The server's one interceptor: the token check, the bounds, the request's parse, and the
    run of a synchronous servicer method on `workers` (held fetches on `held_workers`)."""

    def __init__(self, limits: AdmissionLimits, tokens: TokenCheck | None, workers: Executor,
                 held_workers: Executor, busy: Callable[[], bool] = lambda: False) -> None:
        self.limits, self.tokens = limits, tokens
        # busy(): the shard's request lock is held. A small Fetch then goes to a worker, so the
        # event loop never waits behind a long push or an all-DRAM checkpoint (health checks,
        # refusals and other calls keep being answered)
        self.busy = busy
        self.workers, self.held_workers = workers, held_workers
        self.calls = Places(limits.calls_per_client, limits.calls, "calls")
        self.held = Places(limits.held_per_client, limits.held, "held fetches")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        caller = OPEN_CALLER  # no tokens: every caller may call everything
        if self.tokens is not None:
            caller = self.tokens.identify(handler_call_details.invocation_metadata)
            refused = self.tokens.refusal(method, caller)
            if refused is not None:
                return _refusal(*refused)
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:  # unknown method: UNIMPLEMENTED; no streams served
            return handler
        return self._admitted(handler, method, caller)

    def _admitted(self, handler: grpc.RpcMethodHandler, method: str, caller: Caller) -> grpc.RpcMethodHandler:
        """`handler` as a handler of a request stream, which gRPC calls on the headers alone."""
        token = caller.digest
        if handler.response_streaming:  # the health service's Watch: an aio handler that writes
            async def stream(requests, context):
                client = (_client_host(context.peer()), token)
                async with _Place(self.calls, client, context):
                    request = await self._request(handler, method, context)
                    if inspect.isasyncgenfunction(handler.unary_stream):
                        async for response in handler.unary_stream(request, context):
                            await context.write(response)
                    else:
                        await handler.unary_stream(request, context)
            return grpc.stream_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)

        behavior = handler.unary_unary
        is_async = inspect.iscoroutinefunction(behavior)  # once per call, not in each step below

        async def unary(requests, context):
            client = (_client_host(context.peer()), token)
            async with _Place(self.calls, client, context):
                request = await self._request(handler, method, context)
                if not caller.is_cluster_wide and (refused := namespace_check.refusal(method, request, caller)):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, status_details(refused))
                if method == HELD_METHOD and getattr(request, "min_step", 0) > 0:
                    async with _Place(self.held, client, context):
                        return await self._run(behavior, is_async, request, context, self.held_workers)
                if method == INLINE_METHOD and _num_ids(request) <= self.limits.inline_ids and not self.busy():
                    return await self._run(behavior, is_async, request, context, None)
                response = await self._run(behavior, is_async, request, context, self.workers)
                return namespace_check.narrowed(method, response, caller)  # ListTables, Stats: the caller's tables
        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)

    async def _request(self, handler: grpc.RpcMethodHandler, method: str, context: aio.ServicerContext):
        """The call's one request, parsed; the call aborted when it does not come in time or
        does not parse."""
        try:
            payload = await _read(context, self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, status_details(
                f"{Overloaded.PREFIX} {method}: the request did not arrive within "
                f"{self.limits.body_timeout_s:g} s of its headers"))
        if payload is aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the call sent no request")
        try:
            return parse(handler.request_deserializer, payload, method)
        except Unparsable as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    async def _run(self, behavior, is_async: bool, request, context: aio.ServicerContext,
                   workers: Executor | None):
        """`behavior`'s response: awaited when it is a coroutine function (the health service),
        run right here on the loop when `workers` is None, else run on `workers` with a
        SyncContext. When the call is cancelled meanwhile, the context's callbacks run and the
        thread is waited for before the call's places are given back."""
        if is_async:
            return await behavior(request, context)
        sync_context = SyncContext(context)
        if workers is None:
            try:
                return behavior(request, sync_context)
            except CallAborted as aborted:
                await context.abort(aborted.code, aborted.details)
            finally:
                sync_context.end(cancelled=False)
        future = asyncio.get_running_loop().run_in_executor(workers, behavior, request, sync_context)
        cancelled = False
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
            sync_context.end(cancelled=True)
            await asyncio.wait([future])  # the thread is given back before the places are
            if not future.cancelled():
                future.exception()  # retrieved: the call is gone, nobody hears it
            raise
        except CallAborted as aborted:
            await context.abort(aborted.code, aborted.details)
        finally:
            if not cancelled:
                sync_context.end(cancelled=False)


async def _read(context: aio.ServicerContext, timeout_s: float):
    """The call's request bytes, or asyncio.TimeoutError after `timeout_s`. asyncio.timeout
    (Python 3.11) makes no task per call, as wait_for does."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await context.read()
    return await asyncio.wait_for(context.read(), timeout_s)


def _num_ids(request) -> int:
    """Ids a Fetch request carries over all its tables (int64 each on the wire)."""
    return sum(len(table.ids) for table in request.tables) // 8


class _Place:
    """`async with`: one place of `places` for the call's client, given back when the call ends;
    the call aborted with RESOURCE_EXHAUSTED when none is left."""

    def __init__(self, places: Places, client: tuple, context: aio.ServicerContext) -> None:
        self.places, self.client, self.context = places, client, context

    async def __aenter__(self) -> None:
        try:
            self.places.take(self.client)
        except Overloaded as err:
            await self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, status_details(str(err)))

    async def __aexit__(self, *exc) -> None:
        self.places.give(self.client)


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that answers `code` at once, without reading the request."""
    async def refuse(requests, context):
        await context.abort(code, details)
    return grpc.stream_unary_rpc_method_handler(refuse)
