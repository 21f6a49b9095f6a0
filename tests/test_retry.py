"""The client's re-sending while a shard is unavailable: through a shard that comes up late, and a
clear error once the retry deadline passed (real gRPC on 127.0.0.1)."""
import socket
import threading

import numpy as np
import pytest

from memory_service.client import MemoryClient
from memory_service.config import TableConfig
from memory_service.errors import ShardUnavailable
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
