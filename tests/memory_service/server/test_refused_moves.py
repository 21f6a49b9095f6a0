"""A migration never drops rows: when the destination of a move refuses the rows, they stay where
they were, exact, and every fetch keeps working. Real gRPC servers on loopback, a cold shard with
real LMDB files and a write-ahead log, the hot shard's real Migrator.

The refusal is a real one: a cold shard whose files hold a row with a non-finite optimizer state
(what restoring a checkpoint saved before pushes were checked after the optimizer leaves: Adam's
second moment overflowed by a gradient of 1e22). The hot shard refuses to import non-finite rows;
before the fix the cold shard had already let go of the whole batch, healthy rows included, and
fetches of them failed with RowsMoved until the client gave up."""
import numpy as np
import pytest

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.server.migration import Migrator
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.storage.tiers.base import RowRecords

WIDTH = 4
CFG = TableConfig("m", 1000, WIDTH, seed=2, optimizer=OptimizerConfig("adam", lr=0.01))
IDS = np.arange(10)
BAD = 5  # its second moment is inf


def seeded(path: str) -> RowRecords:
    """Writes table `CFG` at step 1 with rows IDS into the cold shard directory `path`, through
    Shard.restore_table (a checkpoint restore: the rows are stored as the checkpoint holds them);
    returns the records."""
    rng = np.random.default_rng(0)
    state = rng.random((len(IDS), 2 * WIDTH)).astype(np.float32)
    state[BAD, WIDTH:] = np.inf
    records = RowRecords(IDS.copy(), rng.standard_normal((len(IDS), WIDTH)).astype(np.float32), state,
                         np.ones(len(IDS), np.int64))
    shard = Shard(0, 1, StorageConfig(path=path))
    shard.restore_table(CFG, {"step": np.int64(1), "lrs": np.array([np.nan, 0.01])}, [records])
    shard.close()
    return records


@pytest.fixture
def moving(tmp_path):
    """(cold shard, hot shard, migrator, client, the seeded records), torn down after the test."""
    records = seeded(str(tmp_path / "cold"))
    cold = Shard(0, 1, StorageConfig(path=str(tmp_path / "cold")), track_accesses=True)
    hot = Shard(0, 1, role="hot", track_accesses=True)
    hot.create_table(CFG)
    servers = [serve(cold), serve(hot)]
    migrator = Migrator(hot, [servers[0].address], capacity=64)
    client = MemoryClient([servers[0].address], hot_targets=[servers[1].address], timeout=5.0)
    yield cold, hot, migrator, client, records
    client.close()
    migrator.close()
    for server in servers:
        server.stop(grace=None)
    cold.close()


def test_rows_the_hot_shard_refuses_stay_on_their_cold_shard(moving):
    cold, hot, migrator, client, records = moving
    np.testing.assert_array_equal(client.fetch({"m": IDS})["m"].numpy(), records.rows)  # reads: hot candidates
    try:
        migrator.round()  # plans to promote all 10 rows; the hot shard refuses row BAD
    except Exception as err:  # before the fix: the import's InvalidArgument, after the rows were gone
        print(f"migration round failed: {err!r}")
    hot_ids = client.hot_ids("m")
    assert BAD not in hot_ids
    np.testing.assert_array_equal(client.fetch({"m": IDS})["m"].numpy(), records.rows)  # every row, exact
    state = cold.table_state("m")
    kept = state["ids"].tolist().index(BAD)
    np.testing.assert_array_equal(state["state"][kept], records.state[BAD])  # the refused row, as it was
    held = {int(i) for i in state["ids"]} | {int(i) for i in hot.table_state("m")["ids"]}
    assert held == set(IDS.tolist()), "every row is stored on one of the shards"
    assert migrator.counters.returned == 1 and migrator.counters.promoted == len(IDS) - 1, migrator.counters

