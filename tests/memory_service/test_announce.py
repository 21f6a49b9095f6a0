"""Announcements: a trainer tells the rows' homes which ids later steps read (a placement hint).
The shard validates them like a fetch's ids and changes no row; the hot shard's placement sees
them as expected reads; the Prefetcher announces each batch `announce` steps ahead, in order,
never past the last step, and trains on the same batches as without announcing."""
import grpc
import numpy as np
import pytest
import torch

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.wire import codec
from memory_service.errors import InvalidArgument, StepNotReached, TableNotFound
from memory_service.server.migration import Migrator
from memory_service.placement.policy import READ, UNTAGGED
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from trainer.engram import EngramTables
from trainer.prefetch import Prefetcher

CFG = TableConfig("t", 1000, 4, seed=1, optimizer=OptimizerConfig("adam", lr=0.1))


@pytest.fixture
def shard() -> Shard:
    shard = Shard(0, 1, track_accesses=True)
    shard.create_table(CFG)
    shard.push("setup", {"t": TablePush(1, np.array([3, 5]), np.ones((2, 4), np.float32))})
    return shard


def test_announced_ids_reach_placement_and_change_nothing(shard):
    before = shard.digest()
    server = serve(shard)
    try:
        with MemoryClient([server.address]) as client:
            client.announce({"t": np.array([[7, 3], [7, 900]])}).result()
            with pytest.raises(InvalidArgument, match="out of range"):
                client.announce({"t": np.array([1000])}).result()
            with pytest.raises(TableNotFound):
                client.announce({"nope": np.array([1])}).result()
            too_many = memory_pb2.TableIds(table="t", ids=np.zeros(codec.MAX_REQUEST_ROWS + 1, np.int64).tobytes())
            with grpc.insecure_channel(server.address, options=codec.MESSAGE_OPTIONS) as channel:
                with pytest.raises(grpc.RpcError) as refused:  # before the ids are decoded
                    memory_pb2_grpc.MemoryServiceStub(channel).Announce(memory_pb2.AnnounceRequest(tables=[too_many]))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "announce" in refused.value.details()
    finally:
        server.stop(grace=None)
    assert shard.digest() == before
    (events,) = shard.drain_accesses().values()
    assert [(tag, sorted(ids.tolist())) for tag, ids in events] == [(UNTAGGED, [3, 7, 900])]  # distinct, as routed


def test_look_aheads_carry_their_step_in_order(shard):
    """An announcement sent with a step, a fetch held for a step and a fetch served reach
    placement as tagged events in the order the shard saw them (a read fulfils only a look-ahead
    announced before it), over gRPC as the migrator drains a cold shard."""
    server = serve(shard)
    try:
        with MemoryClient([server.address]) as client:
            client.announce({"t": np.array([9, 8])}, step=4).result()
            with pytest.raises(ValueError, match="step -1"):
                client.announce({"t": np.array([1])}, step=-1)
            with pytest.raises(StepNotReached):  # held for step 3 (the table is at 1), then refused
                shard.fetch({"t": np.array([5, 6])}, min_step=3, timeout=0.05)
            client.fetch({"t": np.array([2, 3])})
            client.announce({"t": np.array([0])}, step=0).result()
            with grpc.insecure_channel(server.address, options=codec.MESSAGE_OPTIONS) as channel:
                reply = memory_pb2_grpc.MemoryServiceStub(channel).DrainAccesses(memory_pb2.DrainAccessesRequest())
    finally:
        server.stop(grace=None)
    (table,) = reply.tables
    tags, lengths = codec.decode_ids(table.tags, "t"), codec.decode_ids(table.lengths, "t")
    ids = np.split(codec.decode_ids(table.ids, "t"), np.cumsum(lengths)[:-1])
    assert [(int(t), sorted(i.tolist())) for t, i in zip(tags, ids)] == [
        (4, [8, 9]), (3, [5, 6]), (READ, [2, 3]), (0, [0])]
    assert shard.drain_accesses() == {}


def test_the_migrator_sees_each_announced_step_as_one_request():
    """8 steps announced, each split over the hot shard and 2 cold shards (drained over gRPC) as
    a client routes it, reach the hot shard's policy as 8 requests in step order: the parts of a
    step merge by the step they carry, where one request per part (24) would overflow the
    16-request look-ahead and push the later steps out before they are read."""
    cold = [Shard(i, 2, track_accesses=True) for i in range(2)]
    hot = Shard(0, 1, role="hot", track_accesses=True)
    for s in (*cold, hot):
        s.create_table(CFG)
    servers = [serve(s) for s in cold]
    migrator = Migrator(hot, [server.address for server in servers], capacity=8)
    try:
        for step in range(1, 9):  # hot: 100s + 0, 1; cold shard c: 100s + 2 + c, 100s + 4 + c
            for shard, part in zip((hot, *cold), ([0, 1], [2, 4], [3, 5])):
                shard.announce({"t": 100 * step + np.array(part)}, step)
        assert migrator._observe()
    finally:
        for channel in migrator.channels:
            channel.close()
        for server in servers:
            server.stop(grace=None)
    lookahead = migrator.policies["t"].lookahead
    assert len(lookahead) == 8
    for part in range(6):  # every part of step s at distance s - 1
        np.testing.assert_array_equal(lookahead.distance(100 * np.arange(1, 9) + part), np.arange(8))


def test_a_rejected_announcement_records_nothing(shard):
    with pytest.raises(InvalidArgument):
        shard.announce({"t": np.array([1, -1])})
    assert shard.drain_accesses() == {}


class AnnounceLog(EngramTables):
    """In-process tables that keep every announcement and prefetch in order (what a remote
    implementation would send)."""

    def __init__(self):
        super().__init__()
        self.events = []

    def announce(self, row_ids, min_step=None):
        self.events.append(("announce", row_ids[0].clone(), min_step))

    def prefetch(self, row_ids, min_step=None, ngrams=None):
        self.events.append(("prefetch", row_ids[0].clone(), min_step))


class Indexer:
    """Row ids of a batch: the tokens themselves, as one layer with one head."""

    def __call__(self, x):
        return {0: x.unsqueeze(-1)}


def batches(n: int):
    data = iter([(torch.full((2, 3), i), torch.full((2, 3), -i)) for i in range(n)])
    return lambda: next(data)


@pytest.mark.parametrize("announce,staleness", [(0, 0), (3, 0), (3, 1)])
def test_prefetcher_announces_batches_ahead_in_order(announce, staleness):
    steps = 6
    tables = AnnounceLog()
    feed = Prefetcher(batches(steps), steps, Indexer(), tables, lookahead=True, staleness=staleness,
                      announce=announce)
    seen = [int(feed.next(step).x[0, 0]) for step in range(steps)]
    assert seen == list(range(steps))  # the same batches in the same order
    # each batch's announcement names the min_step its fetch then carries: placement pairs them
    min_steps = {(kind, int(ids[0, 0, 0])): m for kind, ids, m in tables.events}
    for (kind, b), m in min_steps.items():
        assert m == max(0, b - staleness) and (kind == "prefetch" or m == min_steps["prefetch", b]), (kind, b)
    events = [(kind, int(ids[0, 0, 0])) for kind, ids, _ in tables.events]  # (kind, batch)
    assert [b for kind, b in events if kind == "prefetch"] == list(range(steps))
    announced = [(i, b) for i, (kind, b) in enumerate(events) if kind == "announce"]
    assert [b for _, b in announced] == (list(range(1, steps)) if announce else [])  # each once, never past the end
    for i, b in announced:  # batch b is announced when step max(0, b - announce) is prepared, before its fetch
        assert sum(kind == "prefetch" for kind, _ in events[:i]) == max(0, b - announce), (b, events)
