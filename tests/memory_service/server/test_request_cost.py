"""A request's cost is bounded (issue 22, finding 7): the largest fetch a shard allows, of rows
never written (each computed from its seed: the costliest kind), finishes within seconds, the
shard process's memory grows by a small multiple of the reply, and a request from another caller
is answered meanwhile. Against a real shard process (served_shard.py) so its RSS is its own."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from memory_service.config import TableConfig
from memory_service.rpc import memory_pb2
from memory_service.wire import codec, reply_files
from tests.memory_service.server.served_shard import ShardProcess

WIDE = TableConfig(name="wide", num_rows=1 << 20, width=65536, seed=3)
SMALL = TableConfig(name="small", num_rows=1000, width=8, seed=4)
# The shard's peak memory during a fetch, in replies (budgets.py): the rows read, plus for a reply in
# the message its bytes, the message's copy, the serialised message and gRPC's buffers. Before the
# fix the largest allowed fetch (256 MiB) peaked at 14x.
MAX_GROWTH = {"message": 12, "shared memory": 2}  # budgets.py: 9.4x measured on the aio server
TIME_BOUND_S = 20.0  # generous: the budget is ~1-2 s of row init, ~8 s with 8 jobs on the 2 cores


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@pytest.fixture(scope="module")
def shard():
    with ShardProcess([WIDE, SMALL]) as proc:
        yield proc


@pytest.mark.parametrize("reply", ["message", "shared memory"])
def test_the_largest_allowed_fetch_is_bounded_in_time_and_memory(shard, reply):
    num_ids = codec.MAX_REPLY_BYTES // (WIDE.width * 4)
    start_id = {"message": 1 << 16, "shared memory": 1 << 18}[reply]  # rows never read before
    request = memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(
        table="wide", ids=codec.encode_ids(np.arange(start_id, start_id + num_ids)))])
    buf = reply_files.ReplyBuffer(codec.MAX_REPLY_BYTES) if reply == "shared memory" else None
    if buf is not None:
        request.shared_memory.path = buf.path
    small = memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="small", ids=codec.encode_ids(np.arange(4)))])
    shard.stub.Fetch(small, timeout=30)
    peak_before = _vm(shard.pid, "VmHWM")
    result: dict = {}

    def big():
        began = time.monotonic()
        try:
            result["response"] = shard.stub.Fetch(request, timeout=120)
        except Exception as err:  # noqa: BLE001 -- reported below
            result["error"] = err
        result["seconds"] = time.monotonic() - began

    thread = threading.Thread(target=big)
    try:
        thread.start()
        time.sleep(0.2)  # the big fetch is in the shard by now
        began = time.monotonic()
        shard.stub.Fetch(small, timeout=120)
        other_s = time.monotonic() - began
        thread.join(120)
        assert "error" not in result, result.get("error")
        growth = _vm(shard.pid, "VmHWM") - peak_before
        assert result["seconds"] < TIME_BOUND_S, f"the largest allowed fetch took {result['seconds']:.1f} s"
        assert other_s < TIME_BOUND_S, f"another caller's fetch waited {other_s:.1f} s"
        assert growth < MAX_GROWTH[reply] * codec.MAX_REPLY_BYTES, (
            f"the shard's peak RSS grew by {growth / 2**20:.0f} MiB for a {codec.MAX_REPLY_BYTES / 2**20:.0f} MiB reply")
        if buf is None:
            assert len(result["response"].tables[0].rows) == codec.MAX_REPLY_BYTES
    finally:
        thread.join(120)
        if buf is not None:
            buf.close()
