"""A shard that slow, stalled or held callers cannot freeze (issue 22, findings 2 and 3), on real
gRPC servers over 127.0.0.1 with TLS and tokens (the certificates of test_security.py).

Stalled uploads are real: a client-streaming call on a unary method's path sends its headers and
then no message, as a client that never finishes its request body. Held fetches carry a min_step no
push brings. While either kind fills the server, health, Fetch and Stats must answer within seconds,
calls beyond the per-client bounds get RESOURCE_EXHAUSTED, and cancelled or disconnected callers give
their places back."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.client import MemoryClient
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server import budgets
from memory_service.server.admission import AdmissionLimits
from memory_service.server.servicer import SERVICE_NAME, serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.wire import codec
from memory_service.wire.security import ClientSecurity, SecurityConfig
from tests.memory_service.wire.test_security import EMB, pki  # noqa: F401  (pki: the module's certificates)

Code = grpc.StatusCode
READ, WRITE = "read-token-0123", "write-token-4567"
LIMITS = AdmissionLimits(calls_per_client=6, calls=64, held_per_client=4, held=16, body_timeout_s=30.0)
FETCH = memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="emb", ids=codec.encode_ids(np.array([0])))])


@pytest.fixture(scope="module")
def shard() -> Shard:
    shard = Shard(0, 1)
    shard.create_table(EMB)
    shard.push("setup", {"emb": TablePush(1, np.array([0, 2]), np.ones((2, 8), np.float32))})
    return shard


@pytest.fixture(scope="module")
def server(shard, pki):  # noqa: F811
    server = serve(shard, admission=LIMITS, security=SecurityConfig.from_tokens(
        [READ], [WRITE], cert=pki.server_cert, key=pki.server_key))
    yield server
    server.stop(None)


def _channel(server, pki, token: str | None) -> grpc.Channel:  # noqa: F811
    return ClientSecurity(root_cert=pki.ca, token=token).channel(server.address, codec.MESSAGE_OPTIONS)


class Stalled:
    """`n` uploads to `method` that send their headers and never a message, on one channel."""

    def __init__(self, channel: grpc.Channel, method: str, n: int) -> None:
        self.release = threading.Event()
        upload = channel.stream_unary(method)
        self.calls = [upload.future(self._never(), timeout=60) for _ in range(n)]

    def _never(self):
        self.release.wait()
        return
        yield  # a generator that ends without a message once released

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        self.release.set()


def _answers_at_once(server, pki) -> None:  # noqa: F811
    """health, Fetch and Stats each answer within 5 s on a fresh read-token channel."""
    with _channel(server, pki, READ) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                           timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        assert len(stub.Fetch(FETCH, timeout=5).tables[0].rows) == 8 * 4
        stub.Stats(memory_pb2.StatsRequest(), timeout=5)


def _codes(calls, wait_s: float) -> list:
    """The status codes of the calls that ended within `wait_s` (None for those still open)."""
    deadline = time.monotonic() + wait_s
    codes = []
    for call in calls:
        try:
            call.result(timeout=max(0.01, deadline - time.monotonic()))
            codes.append(Code.OK)
        except grpc.FutureTimeoutError:
            codes.append(None)
        except grpc.RpcError as err:
            codes.append(err.code())
    return codes


def test_stalled_uploads_without_a_token_do_not_freeze_the_shard(server, pki):  # noqa: F811
    with _channel(server, pki, None) as channel:
        stalled = Stalled(channel, f"/{SERVICE_NAME}/Push", 24)
        try:
            time.sleep(0.5)  # the server has their headers
            _answers_at_once(server, pki)
            # refused from their headers alone, before any body came
            assert _codes(stalled.calls, 5) == [Code.UNAUTHENTICATED] * 24
        finally:
            stalled.cancel()


def test_stalled_uploads_with_a_token_are_bounded_per_client(server, pki):  # noqa: F811
    with _channel(server, pki, WRITE) as channel:
        stalled = Stalled(channel, f"/{SERVICE_NAME}/Push", 24)
        try:
            time.sleep(0.5)
            _answers_at_once(server, pki)  # another client (its token): its own bound
            codes = _codes(stalled.calls, 2)
            assert codes.count(Code.RESOURCE_EXHAUSTED) == 24 - LIMITS.calls_per_client
            assert codes.count(None) == LIMITS.calls_per_client  # still waiting for their bodies
        finally:
            stalled.cancel()


def _held(stub, n: int, timeout: float = 60):
    request = memory_pb2.FetchRequest(min_step=10**9, tables=FETCH.tables)
    return [stub.Fetch.future(request, timeout=timeout) for _ in range(n)]


def _wait_admitted(server, pki, n: int) -> None:  # noqa: F811
    """Waits (<= 10 s) until the read token's client may hold `n` fetches again."""
    deadline = time.monotonic() + 10
    while True:
        with _channel(server, pki, READ) as channel:
            calls = _held(memory_pb2_grpc.MemoryServiceStub(channel), n)
            codes = _codes(calls, 0.5)
            for call in calls:
                call.cancel()
        if codes == [None] * n or time.monotonic() > deadline:
            assert codes == [None] * n, "the cancelled fetches were not given back"
            return
        time.sleep(0.2)


@pytest.mark.parametrize("leave", ["cancel", "disconnect"])
def test_held_fetches_are_bounded_and_released(server, pki, shard, leave):  # noqa: F811
    channel = _channel(server, pki, READ)
    calls = _held(memory_pb2_grpc.MemoryServiceStub(channel), 20)
    try:
        codes = _codes(calls, 2)
        _answers_at_once(server, pki)
        assert codes.count(Code.RESOURCE_EXHAUSTED) == 20 - LIMITS.held_per_client
        assert codes.count(None) == LIMITS.held_per_client  # held, waiting for step 10**9
    finally:
        if leave == "cancel":
            for call in calls:
                call.cancel()
        channel.close()
    _wait_admitted(server, pki, LIMITS.held_per_client)
    _answers_at_once(server, pki)


def test_a_held_fetch_without_a_deadline_ends_in_seconds(shard):
    assert budgets.MAX_FETCH_WAIT_S <= 60  # seconds, not the ten minutes of issue 22
    quick = serve(shard, max_fetch_wait_s=1.0)
    try:
        with grpc.insecure_channel(quick.address) as channel:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                memory_pb2_grpc.MemoryServiceStub(channel).Fetch(memory_pb2.FetchRequest(
                    min_step=10**9, tables=FETCH.tables))  # no deadline
            assert err.value.code() == Code.DEADLINE_EXCEEDED and time.monotonic() - start < 10
    finally:
        quick.stop(None)


def test_the_client_asks_again_for_a_step_that_comes_after_the_shards_bound():
    """The trainer's look-ahead fetch: a step that takes longer than the shard holds a fetch (1 s
    here) still arrives within the client's own timeout (5 s): MemoryClient sends it again."""
    shard = Shard(0, 1)
    shard.create_table(EMB)
    quick = serve(shard, max_fetch_wait_s=1.0)
    client = MemoryClient([quick.address], timeout=5.0)
    try:
        late = threading.Timer(2.5, lambda: shard.push("late", {"emb": TablePush(
            1, np.array([0]), np.ones((1, 8), np.float32))}))
        late.start()
        rows = client.fetch({"emb": np.array([0, 1])}, min_step=1)
        assert rows["emb"].shape == (2, 8) and shard.describe_table("emb").step == 1
    finally:
        late.cancel()
        client.close()
        quick.stop(None)


def test_the_client_asks_again_when_the_shard_is_overloaded(server, pki):  # noqa: F811
    """Overloaded is refused from the headers, before any state changed: MemoryClient re-sends it
    with backoff, and it is answered once the held fetches that filled its bound are gone."""
    channel = _channel(server, pki, READ)
    held = _held(memory_pb2_grpc.MemoryServiceStub(channel), LIMITS.held_per_client)
    # the Fetch rpc's path (a same-host client would read the row from the shard's arena instead)
    client = MemoryClient([server.address], timeout=20.0, security=ClientSecurity(root_cert=pki.ca, token=READ),
                          direct_reads=False)
    try:
        assert _codes(held, 1) == [None] * LIMITS.held_per_client
        release = threading.Timer(1.5, channel.close)
        release.start()
        start = time.monotonic()
        rows = client.fetch({"emb": np.array([0])}, min_step=1)  # a held fetch: over the bound until released
        assert rows["emb"].shape == (1, 8) and time.monotonic() - start >= 1.0
    finally:
        client.close()
        channel.close()


def test_health_watch_streams_through_admission(server, pki):  # noqa: F811
    with _channel(server, pki, READ) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                          timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_total_bound_and_request_timeout(shard, pki):  # noqa: F811
    """Two clients (two tokens) share the total bound; an admitted upload whose request does not
    come within body_timeout_s is ended with RESOURCE_EXHAUSTED, its place given back."""
    limits = AdmissionLimits(calls_per_client=6, calls=8, held_per_client=2, held=4, body_timeout_s=1.5)
    small = serve(shard, admission=limits, security=SecurityConfig.from_tokens(
        [READ], [WRITE], cert=pki.server_cert, key=pki.server_key))
    try:
        with _channel(small, pki, READ) as reader, _channel(small, pki, WRITE) as writer:
            first = Stalled(reader, f"/{SERVICE_NAME}/Fetch", 6)
            time.sleep(0.3)
            second = Stalled(writer, f"/{SERVICE_NAME}/Push", 6)
            try:
                assert _codes(first.calls, 0.5) == [None] * 6
                assert _codes(second.calls, 0.5).count(Code.RESOURCE_EXHAUSTED) == 4  # 8 in all
                assert _codes(first.calls + second.calls, 5).count(None) == 0  # the timeout ended the rest
            finally:
                first.cancel()
                second.cancel()
            _answers_at_once(small, pki)
    finally:
        small.stop(None)


@pytest.mark.parametrize("inline_ids", [0, 64])
def test_small_fetches_on_the_event_loop_answer_as_on_a_worker(shard, inline_ids):
    """A small plain Fetch runs on the event loop (inline_ids 64) or on a worker (0): the same
    rows, and the same status for a request the shard refuses (the abort path of each)."""
    server = serve(shard, admission=AdmissionLimits(inline_ids=inline_ids))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            ids = np.array([0, 1, 2])
            reply = stub.Fetch(memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(
                table="emb", ids=codec.encode_ids(ids))]), timeout=10)
            rows = codec.decode_rows(reply.tables[0].rows, 3, 8, "float32", "emb")
            np.testing.assert_array_equal(rows, shard.fetch({"emb": ids})["emb"])
            with pytest.raises(grpc.RpcError) as err:
                stub.Fetch(memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(
                    table="nope", ids=codec.encode_ids(ids))]), timeout=10)
            assert err.value.code() == Code.NOT_FOUND
    finally:
        server.stop(None)
