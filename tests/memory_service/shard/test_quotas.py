"""Quotas of rows and bytes per namespace: a push (or a data-parallel step's commit) that would
store rows beyond the namespace's share on a shard is refused with RESOURCE_EXHAUSTED naming the
namespace, the quota and the usage, and changes nothing (the shard's digest); under the quota it
applies. Served over real gRPC on 127.0.0.1 where the status code is the point."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import QuotaExceeded
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server.servicer import serve
from memory_service.shard.quotas import NamespaceQuota, Quotas, bytes_per_row, share
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.wire import codec

OPT = OptimizerConfig(kind="sparse_adam", lr=0.01)  # state: 2 values per row value


def _table(name: str, width: int = 4) -> TableConfig:
    return TableConfig(name=name, num_rows=1000, width=width, seed=2, optimizer=OPT)


def _push(ids, width: int = 4, step: int = 1) -> TablePush:
    ids = np.asarray(ids, np.int64)
    return TablePush(step, ids, np.ones((len(ids), width), np.float32))


def _shard(*quotas: NamespaceQuota, shard_id: int = 0, num_shards: int = 1) -> Shard:
    shard = Shard(shard_id, num_shards, quotas=quotas)
    for name in ("q/t", "q/u", "free/t"):
        shard.create_table(_table(name))
    return shard


def test_shares_sum_to_the_quota():
    for total in (0, 1, 7, 10, 1001):
        assert sum(share(total, i, 4) for i in range(4)) == total
    assert share(None, 0, 4) is None
    assert bytes_per_row(4, 8) == 48
    with pytest.raises(ValueError, match="neither"):
        NamespaceQuota("q")
    with pytest.raises(ValueError, match="twice"):
        Quotas([NamespaceQuota("q", 1), NamespaceQuota("q", 2)], 0, 1)


def test_a_push_over_the_row_quota_is_refused_and_changes_nothing():
    shard = _shard(NamespaceQuota("q", max_rows=10))
    shard.push("c", {"q/t": _push(range(6)), "free/t": _push(range(100))})  # free/t has no quota
    before = shard.digest()
    with pytest.raises(QuotaExceeded, match=r"namespace 'q' is over its quota of 10 rows.*uses 6 rows.*5 more"):
        shard.push("c", {"q/t": _push(range(4, 8), step=2), "q/u": _push(range(3))})  # 2 + 3 new: 11
    assert shard.digest() == before
    assert shard.push("c", {"q/t": _push(range(4, 8), step=2), "q/u": _push(range(2))}) == 6  # 10: at the quota
    shard.push("c", {"q/t": _push(range(8), step=3)})  # rows stored already cost nothing new
    with pytest.raises(QuotaExceeded):
        shard.push("c", {"q/u": _push([999], step=2)})


def test_the_byte_quota_counts_rows_and_optimizer_state():
    per_row = bytes_per_row(4, 8)  # width 4, sparse Adam's two moments
    shard = _shard(NamespaceQuota("q", max_bytes=5 * per_row))
    shard.push("c", {"q/t": _push(range(5))})
    before = shard.digest()
    with pytest.raises(QuotaExceeded, match=f"quota of {5 * per_row} bytes"):
        shard.push("c", {"q/u": _push([0])})
    assert shard.digest() == before


def test_each_shard_enforces_its_share():
    quota = NamespaceQuota("q", max_rows=5)  # shares of 3 and 2 on 2 shards
    first, second = _shard(quota, shard_id=0, num_shards=2), _shard(quota, shard_id=1, num_shards=2)
    first.push("c", {"q/t": _push([0, 2, 4])})
    second.push("c", {"q/t": _push([1, 3])})
    with pytest.raises(QuotaExceeded, match="share 3"):
        first.push("c", {"q/t": _push([6], step=2)})
    with pytest.raises(QuotaExceeded, match="share 2"):
        second.push("c", {"q/t": _push([5], step=2)})


def test_rows_moved_to_a_hot_shard_still_count_on_the_cold_one():
    shard = _shard(NamespaceQuota("q", max_rows=6))
    shard.push("c", {"q/t": _push(range(4))})
    shard.export_rows("q/t", np.array([2, 3, 10, 11]), version=1)  # 2 written and 2 never written leave
    assert shard.describe_table("q/t").rows_materialized == 2
    with pytest.raises(QuotaExceeded, match="uses 6 rows"):  # 2 here + 4 away
        shard.push("c", {"q/t": _push([20], step=2)})
    hot = Shard(0, 1, role="hot", quotas=[NamespaceQuota("q", max_rows=0)])  # hot shards enforce nothing
    hot.create_table(_table("q/t"))
    assert not hot.quotas


def test_a_data_parallel_step_over_the_quota_is_refused_at_its_completing_part():
    shard = _shard(NamespaceQuota("q", max_rows=4))
    assert shard.push("w0", {"q/t": _push([0, 1])}, contributors=2) == 0  # held: stores nothing yet
    before = shard.digest()
    with pytest.raises(QuotaExceeded):
        shard.push("w1", {"q/t": _push([2, 3, 4])}, contributors=2)  # the sum would store 5
    assert shard.digest() == before
    assert shard.push("w1", {"q/t": _push([2, 3])}, contributors=2) == 4


def test_over_quota_over_grpc_is_resource_exhausted():
    shard = _shard(NamespaceQuota("q", max_rows=3))
    server = serve(shard)
    try:
        with grpc.insecure_channel(server.address, options=codec.MESSAGE_OPTIONS) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)

            def push(ids, step):
                grads = np.ones((len(ids), 4), np.float32)
                return stub.Push(memory_pb2.PushRequest(client_id="g", tables=[memory_pb2.TableGrads(
                    table="q/t", step=step, dtype=memory_pb2.DTYPE_FLOAT32, width=4,
                    ids=codec.encode_ids(np.array(ids, np.int64)), grads=codec.encode_rows(grads, "float32"))]),
                    timeout=10)
            assert push([0, 1], 1).rows_updated == 2
            before = shard.digest()
            with pytest.raises(grpc.RpcError) as err:
                push([2, 3], 2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "namespace 'q'" in err.value.details() and "quota of 3 rows" in err.value.details()
            assert shard.digest() == before
            assert push([2], 2).rows_updated == 1
        with MemoryClient([server.address]) as client:  # the client raises the quota's own error
            with pytest.raises(QuotaExceeded, match="namespace 'q'"):
                client.push({"q/t": (np.array([7]), torch.ones(1, 4))}, step=3)
        assert shard.digest() != before and shard.describe_table("q/t").rows_materialized == 3
    finally:
        server.stop(None)


def test_an_import_over_the_row_quota_is_refused_and_changes_nothing():
    """WriteRecords (what `engram import` sends) counts against the quota as a push does."""
    from memory_service.storage.tiers.base import RowRecords

    def records(ids):
        ids = np.asarray(ids, np.int64)
        return RowRecords(ids, np.ones((len(ids), 4), np.float32), np.empty((len(ids), 0), np.float32),
                          np.zeros(len(ids), np.int64))  # no state: the rows' new state and the table's step

    shard = _shard(NamespaceQuota("q", max_rows=10))
    assert shard.write_records("q/t", records(range(8)), has_state=False) == 8
    before = shard.digest()
    with pytest.raises(QuotaExceeded, match="namespace 'q' is over its quota of 10 rows"):
        shard.write_records("q/t", records(range(5, 11)), has_state=False)  # 3 new: 11
    assert shard.digest() == before
    assert shard.write_records("q/t", records(range(5, 10)), has_state=False) == 5  # 2 new: at the quota
