"""The client's re-sending while a shard is unavailable: through a shard that comes up late, and a
clear error once the retry deadline passed (real gRPC on 127.0.0.1); and the re-sending of rows
that moved (RetryPolicy.resend_moved) under the same policy's backoff and deadline."""
import socket
import threading
import time

import numpy as np
import pytest

from memory_service.client import MemoryClient
from memory_service.config import TableConfig
from memory_service.errors import RowsMoved, ShardUnavailable
from memory_service.wire.retry import RetryPolicy
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_shard_that_never_answers_raises_shard_unavailable_naming_it():
    port = free_port()  # nothing listens there
    with MemoryClient([f"127.0.0.1:{port}"], retry=RetryPolicy(deadline_s=0.5, initial_backoff_s=0.02),
                      shared_memory=False) as client:
        with pytest.raises(ShardUnavailable, match=rf"DescribeTable to cold shard 0 at 127.0.0.1:{port}: "
                                                   rf"unavailable for 0\.\d s, \d+ retries \(retry deadline 0\.5 s\)"):
            client.fetch({"t": np.arange(4)})
        assert client.retries > 0


def test_the_client_waits_for_a_shard_that_comes_up_late():
    """A shard that starts listening 1 s after the client's first push (as a restarted one does):
    the push is re-sent until it lands, and applied once."""
    port = free_port()
    shard = Shard(0, 1)
    shard.create_table(TableConfig("t", 100, 4))
    servers = []
    timer = threading.Timer(1.0, lambda: servers.append(serve(shard, port=port)))
    timer.start()
    try:
        with MemoryClient([f"127.0.0.1:{port}"], retry=RetryPolicy(deadline_s=30), shared_memory=False) as client:
            client.tables["t"] = TableConfig("t", 100, 4)  # known: the first rpc is the push itself
            assert client.push({"t": (np.arange(10), np.ones((10, 4), np.float32))}, step=1) == 10
            assert client.retries > 0
        assert shard.counters.push_requests == 1 and shard.describe_table("t").step == 1
    finally:
        timer.join()
        for server in servers:
            server.stop(0)


@pytest.mark.parametrize("kw, match", [(dict(deadline_s=-1), "deadline_s -1"),
                                       (dict(initial_backoff_s=3.0, max_backoff_s=2.0), "initial_backoff_s 3.0"),
                                       (dict(multiplier=0.5), "multiplier 0.5")])
def test_bad_retry_policies_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kw)


def test_moved_rows_are_re_sent_until_none_is_refused():
    calls = []

    def resend(refused):  # each round one fewer row of "t" is refused; "u" lands at once
        calls.append(refused)
        return {"t": refused["t"][1:]} if len(refused.get("t", [])) > 1 else {}

    RetryPolicy.for_moved_rows(5.0).resend_moved({"t": [1, 2, 3], "u": [4]}, resend, "fetch")
    assert calls == [{"t": [1, 2, 3], "u": [4]}, {"t": [2, 3]}, {"t": [3]}]
    RetryPolicy.for_moved_rows(5.0).resend_moved({}, resend, "fetch")  # nothing refused: nothing sent
    assert len(calls) == 3


def test_rows_that_keep_moving_raise_rows_moved_at_the_deadline():
    calls = []
    policy = RetryPolicy(deadline_s=0.3, initial_backoff_s=0.001, max_backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RowsMoved, match=r"push of step 7: rows of tables \['t'\] kept moving for 0\.\d s, "
                                        r"\d+ re-sends \(deadline 0\.3 s\)"):
        policy.resend_moved({"t": [1]}, lambda refused: calls.append(1) or refused, "push of step 7")
    assert 0.3 <= time.monotonic() - start < 2.0  # the last re-send is made at the deadline
    assert len(calls) > 5  # waits start at 1 ms, not at a restart's 50 ms
    with pytest.raises(RowsMoved):  # deadline 0: never re-sends
        RetryPolicy(deadline_s=0).resend_moved({"t": [1]}, lambda refused: calls.append(1) or refused, "fetch")
    assert len(calls) > 5


def test_backoff_waits_grow_to_the_cap_and_end_at_the_deadline():
    backoff = RetryPolicy(deadline_s=10.0, initial_backoff_s=0.1, max_backoff_s=0.4).backoff()
    waits = [backoff.next_wait() for _ in range(5)]
    for wait, nominal in zip(waits, [0.1, 0.2, 0.4, 0.4, 0.4]):
        assert nominal / 2 <= wait <= nominal  # jittered within [1/2, 1] of the nominal wait
    assert backoff.tries == 5
    assert RetryPolicy(deadline_s=0).backoff().next_wait() is None
