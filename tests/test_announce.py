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
from memory_service import wire
from memory_service.errors import InvalidArgument, TableNotFound
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.servicer import serve
from memory_service.shard import Shard, TablePush
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
            too_many = memory_pb2.TableIds(table="t", ids=np.zeros(wire.MAX_REQUEST_ROWS + 1, np.int64).tobytes())
            with grpc.insecure_channel(server.address, options=wire.MESSAGE_OPTIONS) as channel:
                with pytest.raises(grpc.RpcError) as refused:  # before the ids are decoded
                    memory_pb2_grpc.MemoryServiceStub(channel).Announce(memory_pb2.AnnounceRequest(tables=[too_many]))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "announce" in refused.value.details()
    finally:
        server.stop(grace=None)
    assert shard.digest() == before
    (requests, expected), = shard.drain_accesses().values()
    assert requests == [] and sorted(expected.tolist()) == [3, 7, 900]  # distinct, as routed


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

    def announce(self, row_ids):
        self.events.append(("announce", row_ids[0].clone()))

    def prefetch(self, row_ids, min_step=None, ngrams=None):
        self.events.append(("prefetch", row_ids[0].clone()))


class Indexer:
    """Row ids of a batch: the tokens themselves, as one layer with one head."""

    def __call__(self, x):
        return {0: x.unsqueeze(-1)}


def batches(n: int):
    data = iter([(torch.full((2, 3), i), torch.full((2, 3), -i)) for i in range(n)])
    return lambda: next(data)


@pytest.mark.parametrize("announce", [0, 3])
def test_prefetcher_announces_batches_ahead_in_order(announce):
    steps = 6
    tables = AnnounceLog()
    feed = Prefetcher(batches(steps), steps, Indexer(), tables, lookahead=True, announce=announce)
    seen = [int(feed.next(step).x[0, 0]) for step in range(steps)]
    assert seen == list(range(steps))  # the same batches in the same order
    events = [(kind, int(ids[0, 0, 0])) for kind, ids in tables.events]  # (kind, batch)
    assert [b for kind, b in events if kind == "prefetch"] == list(range(steps))
    announced = [(i, b) for i, (kind, b) in enumerate(events) if kind == "announce"]
    assert [b for _, b in announced] == (list(range(1, steps)) if announce else [])  # each once, never past the end
    for i, b in announced:  # batch b is announced when step max(0, b - announce) is prepared, before its fetch
        assert sum(kind == "prefetch" for kind, _ in events[:i]) == max(0, b - announce), (b, events)
