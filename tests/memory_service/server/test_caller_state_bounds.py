"""Issue 22, finding 6: memory a caller can make a shard keep. Every per-caller state has a bound
and an expiry; a request past a bound is refused (RESOURCE_EXHAUSTED, or INVALID_ARGUMENT for a
step that is simply invalid) and changes nothing. A real Shard behind a real gRPC server on
127.0.0.1, called through a real channel; sizes scaled down from the finding's, proportionally."""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from memory_service.config import (
    MAX_ACCESS_LOG_IDS,
    OptimizerConfig,
    StorageConfig,
    TableConfig,
)
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


def test_the_step_logs_bytes_grow_with_steps_pushed_not_with_their_distance(served):
    """The shard's own count of the step log's bytes: 10 steps 2**20 apart add 16 bytes each (plus
    the log's spare capacity), where a slot per step took 80 MiB."""
    fresh = dataclasses.replace(SPARSE, name="fresh")
    served.shard.create_table(fresh)
    before = served.shard.caller_state()["step_log_bytes"]
    for i in range(1, 11):
        served.push(grads_msg(fresh, i * JUMP, np.empty(0, np.int64)))
    grown = served.shard.caller_state()["step_log_bytes"] - before
    assert grown < 64 << 10, f"10 steps 2**20 apart took {grown} bytes of step log"


# --- data-parallel parts (Push with contributors K > 1, with or without commit_later) ---------------
PART_IDS = 2048  # a part: 2048 ids x width 64 fp32 = 528 KiB held (ids + gradients)
PART_BYTES = PART_IDS * 8 + PART_IDS * SPARSE.width * 4


def parts_shard(**bounds) -> Served:
    shard = Shard(0, 1, storage=StorageConfig(**bounds))
    shard.create_table(SPARSE)
    return Served(shard)


def part(served: Served, client: str, step: int, commit_later: bool = True, seed: int = 0):
    ids = np.arange(PART_IDS) * 3 + seed
    return served.push(grads_msg(SPARSE, step, ids, seed), client_id=client, contributors=2,
                       commit_later=commit_later)


def commit(served: Served, client: str, step: int):
    return served.stub.CommitStep(memory_pb2.CommitStepRequest(
        client_id=client, contributors=2, tables=[memory_pb2.TableStep(table=SPARSE.name, step=step)]))


def test_parts_held_are_bounded_per_client_and_per_shard(tmp_path):
    """8 workers' uncommitted parts were kept whatever their size (+922 MiB from 8). Now a part past
    the client's or the shard's bound is refused with RESOURCE_EXHAUSTED, changing nothing, and a
    completed step gives its room back."""
    served = parts_shard(parts_max_bytes=5 * PART_BYTES + 100, parts_client_max_bytes=3 * PART_BYTES + 100)
    try:
        for step in (1, 2, 3):  # commit_later parts of worker 0: its bound is 3 parts
            part(served, "w0", step)
        msg = served.refused(Code.RESOURCE_EXHAUSTED, part, served, "w0", 4)
        assert "client 'w0'" in msg and "parts_client_max_bytes" in msg
        for step in (10, 11):  # whole parts of worker 1: the shard's bound is 5 parts
            part(served, "w1", step, commit_later=False, seed=1)
        msg = served.refused(Code.RESOURCE_EXHAUSTED, part, served, "w2", 12, seed=2)
        assert "parts_max_bytes" in msg
        # a whole part that completes its step is applied at once, never held: taken at the bound
        assert part(served, "w2", 10, commit_later=False, seed=2).rows_updated == 2 * PART_IDS
        part(served, "w1", 12, commit_later=False, seed=1)  # in step 10's room
        state = served.shard.caller_state()
        assert state["parts_bytes"] == 5 * PART_BYTES and state["open_steps"] == 5
        commit(served, "w0", 1)  # both workers commit step 1 (w1 had nothing of it): applied, its room is free
        assert commit(served, "w1", 1).rows_updated == PART_IDS
        assert served.shard.caller_state()["parts_bytes"] == 4 * PART_BYTES
        part(served, "w0", 4)  # room again, for the shard and for w0
        assert served.shard.caller_state()["parts_bytes"] == 5 * PART_BYTES
    finally:
        served.close()


def test_a_step_not_complete_within_parts_expiry_s_is_dropped_and_its_late_parts_refused():
    """The finding's 8 uncommitted parts, kept forever before: dropped once parts_expiry_s passed
    (the next request of any kind drops them), and the trainer whose commit or part comes after
    that gets FAILED_PRECONDITION saying the step expired; no row moved."""
    served = parts_shard(parts_expiry_s=2.0)  # time for the 8 pushes on a busy machine
    try:
        before = served.shard.digest()
        for step in range(1, 9):
            part(served, "w0", step)
        assert served.shard.caller_state()["parts_bytes"] == 8 * PART_BYTES
        time.sleep(2.1)
        served.stub.Fetch(memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(
            table=SPARSE.name, ids=codec.encode_ids(np.array([0])))]))
        state = served.shard.caller_state()
        assert (state["parts_bytes"], state["open_steps"]) == (0, 0), state
        msg = served.refused(Code.FAILED_PRECONDITION, commit, served, "w1", 3)
        assert "table 'sparse' step 3: its data-parallel parts expired" in msg and "parts_expiry_s 2 s" in msg
        served.refused(Code.FAILED_PRECONDITION, part, served, "w1", 5, seed=1)
        assert served.shard.digest() == before
        part(served, "w0", 9)  # later steps are taken as before
        part(served, "w1", 9, seed=1)
        assert commit(served, "w0", 9).rows_updated == 0 and commit(served, "w1", 9).rows_updated == 2 * PART_IDS
    finally:
        served.close()


# --- access logs (hot shards and cold shards beside them keep reads for the migrator) ----------------
HELD_IDS = 20_000  # ids of each held fetch
LOG_IDS = 50_000  # the access log's bound here (of 24 x 20k ids the held fetches named)


def hold_fetches(served: Served, num: int, step: int) -> None:
    """`num` fetches held for table step `step`, which never comes: each times out after 0.3 s."""
    def fetch(i: int) -> None:
        ids = np.arange(i, SPARSE.num_rows, SPARSE.num_rows // HELD_IDS)[:HELD_IDS]
        with pytest.raises(grpc.RpcError) as info:
            served.stub.Fetch(memory_pb2.FetchRequest(min_step=step, tables=[memory_pb2.TableIds(
                table=SPARSE.name, ids=codec.encode_ids(ids))]), timeout=0.3)
        assert info.value.code() == Code.DEADLINE_EXCEEDED

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, range(num)))


def test_held_fetches_keep_at_most_access_log_ids_and_a_drain_fits_a_reply():
    """24 held fetches copied their ids into the access log (+1.9 GiB, kept until a drain whose reply
    exceeded the message limit). Now the log keeps at most access_log_ids ids, the oldest dropped,
    and a DrainAccesses reply fits a channel that takes access_log_ids ids and a little more."""
    shard = Shard(0, 1, track_accesses=True, storage=StorageConfig(access_log_ids=LOG_IDS))
    shard.create_table(SPARSE)
    served = Served(shard)
    try:
        hold_fetches(served, 24, step=10**6)
        assert served.shard.caller_state()["access_log_ids"] <= LOG_IDS
        options = [("grpc.max_receive_message_length", LOG_IDS * 8 + (64 << 10))]
        with grpc.insecure_channel(served.server.address, options=options) as channel:
            reply = memory_pb2_grpc.MemoryServiceStub(channel).DrainAccesses(memory_pb2.DrainAccessesRequest())
        (table,) = reply.tables
        assert 0 < len(codec.decode_ids(table.ids, SPARSE.name)) <= LOG_IDS
        assert served.shard.caller_state()["access_log_ids"] == 0
    finally:
        served.close()


def test_access_log_events_expire_after_access_log_expiry_s():
    shard = Shard(0, 1, track_accesses=True, storage=StorageConfig(access_log_expiry_s=2.0))
    shard.create_table(SPARSE)
    served = Served(shard)
    try:
        hold_fetches(served, 2, step=10**6)
        assert served.shard.caller_state()["access_log_ids"] == 2 * HELD_IDS  # nothing read: 2 look-aheads
        time.sleep(2.1)
        reply = served.stub.DrainAccesses(memory_pb2.DrainAccessesRequest())
        assert list(reply.tables) == [] and served.shard.caller_state()["access_log_ids"] == 0
    finally:
        served.close()


def test_the_largest_access_log_a_config_allows_fits_one_message():
    assert MAX_ACCESS_LOG_IDS * 8 + 4096 * 3 * 8 + (1 << 20) <= codec.MAX_MESSAGE_BYTES
    with pytest.raises(ValueError, match="access_log_ids"):
        StorageConfig(access_log_ids=MAX_ACCESS_LOG_IDS + 1)
