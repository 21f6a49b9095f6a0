"""A durable hot shard's migrator finishes the move a crash cut in half (server/migration.py,
move_intent.py): two cold shards served over real gRPC on loopback, a hot shard with its own LMDB
directory and write-ahead log, and a move stopped between its export and its import, then the hot
shard closed and reopened from its files as a restart would. Every row ends in exactly one home with
the values it had, and finishing the move again changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server.migration import Migrator
from memory_service.server.move_intent import Move, MoveIntent
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.wire import codec
from memory_service.wire.security import open_channel

TABLE = TableConfig("t", 1000, 4, seed=3, optimizer=OptimizerConfig("sparse_adam", lr=0.1))
IDS = np.arange(0, 40, dtype=np.int64)  # rows of both cold shards


@pytest.fixture
def shards(tmp_path):
    """(cold shards, their servers, a function opening the hot shard over its directory)."""
    cold = [Shard(i, 2, StorageConfig(path=str(tmp_path / f"shard-{i:04d}"))) for i in range(2)]
    servers = [serve(shard) for shard in cold]
    for shard in cold:
        shard.create_table(TABLE)
        mine = IDS[IDS % 2 == shard.shard_id]
        shard.push("trainer", {"t": TablePush(1, mine, np.ones((len(mine), 4), np.float32))})

    def open_hot() -> Shard:
        hot = Shard(0, 1, StorageConfig(path=str(tmp_path / "hot-0000")), role="hot", track_accesses=True)
        hot.create_table(TABLE)
        return hot

    yield cold, servers, open_hot
    for server, shard in zip(servers, cold):
        server.stop(0)
        shard.close()


def migrator(hot: Shard, servers) -> Migrator:
    return Migrator(hot, [s.address for s in servers], capacity=64)


def homes(cold: list[Shard], hot: Shard) -> dict[int, tuple]:
    """id -> (its home, row) over the three shards; a row held twice fails."""
    out = {}
    for where, shard in [("cold", cold[0]), ("cold", cold[1]), ("hot", hot)]:
        state = shard.table_state("t")
        for i, row_id in enumerate(state["ids"].tolist()):
            assert row_id not in out, f"row {row_id} has two homes"
            out[row_id] = (where, state["rows"][i].tolist())
    return out


def test_a_promote_cut_after_the_export_is_finished_after_a_restart(shards):
    cold, servers, open_hot = shards
    hot = open_hot()
    before = {i: row for i, (_, row) in homes(cold, hot).items()}  # all cold
    part = IDS[IDS % 2 == 1][:8]
    MoveIntent(hot.storage.path).begin(Move("promote", "t", part, 1, "migrator-dead", 7))
    with open_channel(servers[1].address) as channel:  # the cold half happened, then the hot shard died
        memory_pb2_grpc.MemoryServiceStub(channel).ExportRows(memory_pb2.ExportRowsRequest(
            table="t", ids=codec.encode_ids(part), version=1, client_id="migrator-dead", request_seq=7))
    hot.close()
    hot = open_hot()  # restarted from its files
    try:
        m = migrator(hot, servers)
        assert m.resume() == len(part) and MoveIntent(hot.storage.path).pending() is None
        after = homes(cold, hot)
        assert {i for i, (where, _) in after.items() if where == "hot"} == set(part.tolist())
        assert {i: row for i, (_, row) in after.items()} == before
        hot.push("trainer", {"t": TablePush(2, part, np.full((len(part), 4), 5, np.float32))})
        updated = homes(cold, hot)
        MoveIntent(hot.storage.path).begin(Move("promote", "t", part, 1, "migrator-dead", 7))
        m.resume()  # finished twice: the export's answer again, but the import keeps the rows it holds
        assert homes(cold, hot) == updated != after
        m.close()
    finally:
        hot.close()


def test_a_demote_cut_after_the_hot_export_is_finished_after_a_restart(shards):
    cold, servers, open_hot = shards
    hot = open_hot()
    m = migrator(hot, servers)
    m._promote("t", IDS[:10])  # rows 0..9 hot, written down and done
    assert MoveIntent(hot.storage.path).pending() is None
    hot.push("trainer", {"t": TablePush(2, IDS[:10], np.full((10, 4), 2, np.float32))})
    before = {i: row for i, (_, row) in homes(cold, hot).items()}
    evict = IDS[:6]
    MoveIntent(hot.storage.path).begin(Move("demote", "t", evict, hot.homes.version + 1, m.client_id, 99))
    hot.export_rows("t", evict, hot.homes.version + 1, m.client_id, 99)  # the hot half, then the crash
    m.close()
    hot.close()
    hot = open_hot()
    try:
        m = migrator(hot, servers)
        assert m.resume() == len(evict)
        after = homes(cold, hot)
        assert {i for i, (where, _) in after.items() if where == "hot"} == set(IDS[6:10].tolist())
        assert hot.hot_map("t")[1].tolist() == IDS[6:10].tolist()  # its checkpoint kept what it holds
        assert {i: row for i, (_, row) in after.items()} == before
        m.close()
    finally:
        hot.close()

