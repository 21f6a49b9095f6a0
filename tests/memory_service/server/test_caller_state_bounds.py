"""Issue 22, finding 6: memory a caller can make a shard keep. Every per-caller state has a bound
and an expiry; a request past a bound is refused (RESOURCE_EXHAUSTED, or INVALID_ARGUMENT for a
step that is simply invalid) and changes nothing. A real Shard behind a real gRPC server on
127.0.0.1, called through a real channel; sizes scaled down from the finding's, proportionally."""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.wire import codec

Code = grpc.StatusCode
SPARSE = TableConfig(name="sparse", num_rows=1 << 20, width=64, seed=1,
                     optimizer=OptimizerConfig(kind="sparse_adam", lr=0.01))
JUMP = 1 << 20  # the finding's: each empty push 2**20 steps ahead of the table


def rss_bytes() -> int:
    """This process's resident memory now (the shard serves in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def grads_msg(cfg: TableConfig, step: int, ids: np.ndarray, seed: int = 0) -> memory_pb2.TableGrads:
    grads = np.random.default_rng(seed).standard_normal((len(ids), cfg.width)).astype(np.float32)
    return memory_pb2.TableGrads(table=cfg.name, step=step, dtype=codec.dtype_to_proto(cfg.dtype), width=cfg.width,
                                 ids=codec.encode_ids(np.asarray(ids, np.int64)),
                                 grads=codec.encode_rows(grads, cfg.dtype))


class Served:
    """A shard behind gRPC on loopback, and a stub to it."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.server = serve(shard)
        self.channel = grpc.insecure_channel(self.server.address, options=codec.MESSAGE_OPTIONS)
        self.stub = memory_pb2_grpc.MemoryServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)

    def push(self, *tables, client_id: str = "caller", **fields) -> memory_pb2.PushResponse:
        return self.stub.Push(memory_pb2.PushRequest(client_id=client_id, tables=tables, **fields))

    def refused(self, code: Code, call, *args, **kwargs) -> str:
        """Calls `call`, which must fail with `code` and leave the shard's digest as it was;
        returns the status message."""
        before = self.shard.digest()
        with pytest.raises(grpc.RpcError) as info:
            call(*args, **kwargs)
        assert info.value.code() == code, info.value.details()
        assert self.shard.digest() == before
        return info.value.details()


@pytest.fixture(scope="module")
def served():
    shard = Shard(0, 1)
    shard.create_table(SPARSE)
    served = Served(shard)
    yield served
    served.close()


def test_steps_far_ahead_cost_what_any_push_costs(served):
    """200 empty pushes 2**20 steps ahead grew the step log by +2 GiB (8 bytes per step skipped,
    never freed); 40 of them, here, would keep >= 320 MiB. Now each costs one entry."""
    base = served.shard.describe_table(SPARSE.name).step
    served.push(grads_msg(SPARSE, base + 1, np.array([1, 2, 3])))
    before = rss_bytes()
    for i in range(1, 41):
        served.push(grads_msg(SPARSE, base + 1 + i * JUMP, np.empty(0, np.int64)))
    grown = rss_bytes() - before
    step = base + 1 + 40 * JUMP
    assert served.shard.describe_table(SPARSE.name).step == step
    assert grown < 32 << 20, f"40 pushes 2**20 steps ahead kept {grown / 2**20:.0f} MiB"
    # the log still answers for every step it holds: a step far back keeps its lr, a skipped one takes any
    msg = served.refused(Code.INVALID_ARGUMENT, served.push,
                         memory_pb2.TableGrads(table=SPARSE.name, step=base + 1 + JUMP, lr=0.5, width=SPARSE.width,
                                               dtype=codec.dtype_to_proto(SPARSE.dtype)))
    assert "was pushed with learning rate 0.01, not 0.5" in msg
    served.push(grads_msg(SPARSE, base + 2, np.array([4]), seed=1))  # a stale step never pushed
    assert served.shard.table_state(SPARSE.name)["steps"].tolist() == [
        base + 1, base + 2, *(base + 1 + i * JUMP for i in range(1, 41))]


def test_a_step_beyond_the_jump_bound_is_invalid_and_changes_nothing(served):
    step = served.shard.describe_table(SPARSE.name).step
    msg = served.refused(Code.INVALID_ARGUMENT, served.push, grads_msg(SPARSE, step + JUMP + 1, np.array([1])))
    assert f"more than {JUMP} steps beyond the table's step {step}" in msg
