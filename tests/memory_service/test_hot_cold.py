"""Hot and cold shards: rows migrate between 1 hot and 2 cold shards as reads shift, and the
tables end exactly as all-DRAM shards given the same pushes would hold them, every fetch along the
way seeing the current rows."""
import numpy as np
import pytest
import ray

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

pytestmark = pytest.mark.slow

WIDTH = 8
TABLE = TableConfig("hc", 5000, WIDTH, init_scale=0.1, seed=4,
                    optimizer=OptimizerConfig("adam", lr=0.01, beta1=0.9, beta2=0.95))


def merged_state(cluster, name: str) -> dict[int, tuple]:
    """id -> (row, state, last) over every shard, cold and hot (each row in exactly one)."""
    out = {}
    for actor in [*cluster.actors, *cluster.hot_actors]:
        state = ray.get(actor.table_state.remote(name))
        for i, row_id in enumerate(state["ids"].tolist()):
            assert row_id not in out, f"row {row_id} held by two shards"
            out[row_id] = (state["rows"][i], state["state"][i], state["last"][i])
    return out


@pytest.mark.parametrize("disk", [False, True], ids=["dram", "dram+lmdb"])
def test_migrating_rows_stay_exact(make_cluster, tmp_path, disk):
    """With `disk`, the cold shards keep ~250 rows in DRAM over LMDB: rows also move between DRAM
    and LMDB inside each cold shard all along, and reads and pushes hit LMDB."""
    storage = StorageConfig(path=str(tmp_path), dram_budget_bytes=32 << 10, placement_interval_s=0.01) \
        if disk else StorageConfig()
    cluster = make_cluster(2, num_hot=1, hot_rows=64, migrate_interval_s=0.005,
                           migrate_max_duty=1.0, storage=storage)  # migrate back to back: constant moves
    reference = Shard(0, 1)
    reference.create_table(TABLE)
    rng = np.random.default_rng(0)
    hot_sets = [rng.choice(5000, 300, replace=False) for _ in range(4)]  # the popular rows shift
    with cluster.client() as client:
        client.create_table(TABLE)
        for step in range(1, 61):
            popular = hot_sets[(step // 15) % 4]
            ids = np.unique(np.r_[rng.choice(popular, 200), rng.integers(0, 5000, 50)])
            got = client.fetch({"hc": ids}, min_step=step - 1)["hc"].numpy()
            np.testing.assert_array_equal(got, reference.fetch({"hc": ids})["hc"], err_msg=f"step {step}")
            grads = rng.normal(size=(len(ids), WIDTH)).astype(np.float32)
            client.push({"hc": (ids, grads)}, step=step, lr=0.01 * (1 + step % 3))
            reference.push("ref", {"hc": TablePush(step, ids, grads, lr=0.01 * (1 + step % 3))})
        ray.get(cluster.hot_actors[0].stop_migration.remote())  # rows hold still while we read them all
        counters = ray.get(cluster.hot_actors[0].migration_counters.remote())
        refreshes = client.refreshes
        tiers = [tier for shard in client.report().shards if shard.role == "cold"
                 for table in shard.tables for tier in table.tiers]
        everything = np.arange(5000)
        np.testing.assert_array_equal(client.fetch({"hc": everything}, min_step=60)["hc"].numpy(),
                                      reference.fetch({"hc": everything})["hc"])
    assert counters["promoted"] > 0 and counters["demoted"] > 0 and not counters["error"], counters
    assert refreshes > 0
    if disk:  # DRAM <-> LMDB inside the cold shards
        memory = [t for t in tiers if t.tier == "dram"]
        cold = [t for t in tiers if t.tier == "disk"]
        assert len(memory) == len(cold) == 2
        assert all(t.demotions > 0 and t.promotions > 0 for t in memory), memory
        assert all(t.hits > 0 for t in cold), cold  # reads served from LMDB
    state, ref = merged_state(cluster, "hc"), reference.table_state("hc")
    assert sorted(state) == sorted(ref["ids"].tolist())
    for i, row_id in enumerate(ref["ids"].tolist()):
        row, opt, last = state[row_id]
        np.testing.assert_array_equal(row, ref["rows"][i])
        np.testing.assert_array_equal(opt, ref["state"][i])
        assert last == ref["last"][i]


def test_a_refused_fetch_resends_only_the_moved_rows(make_cluster):
    """A client whose hot map is stale sends rows that moved to the hot shard to their old cold
    shard, which refuses its request; only refused requests are sent again, so every row of the
    fetch is read exactly once over the shards (re-sending the whole fetch read the rows of the
    shards that had answered twice)."""
    cluster = make_cluster(2, num_hot=1, hot_rows=64, migrate_interval_s=0.005, migrate_max_duty=1.0)
    table = TableConfig("resend", 1000, WIDTH, init_scale=0.1, seed=5, optimizer=TABLE.optimizer)
    even, ids = np.arange(0, 200, 2), np.arange(200)
    with cluster.client() as stale, cluster.client() as reader:
        reader.create_table(table)
        assert len(stale.hot_ids("resend")) == 0  # loaded now, never refreshed until refused
        reader.push({"resend": (even, np.ones((len(even), WIDTH), np.float32))}, step=1, lr=0.01)
        for _ in range(500):  # read the written rows until some moved to the hot shard
            reader.fetch({"resend": even}, min_step=1)
            if ray.get(cluster.hot_actors[0].migration_counters.remote())["promoted"]:
                break
        ray.get(cluster.hot_actors[0].stop_migration.remote())
        expected = reader.fetch({"resend": ids}, min_step=1)["resend"].numpy()
        reader.stats()  # its direct reads reported now, not during the stale client's fetch
        before = stale.report()
        got = stale.fetch({"resend": ids}, min_step=1)["resend"].numpy()
        after = stale.report()
    np.testing.assert_array_equal(got, expected)
    read = {(a.role, a.shard_id): sum(t.rows_read for t in a.tables) - sum(t.rows_read for t in b.tables)
            for a, b in zip(after.shards, before.shards)}
    assert stale.refreshes >= 1 and read[("hot", 0)] > 0, read  # refused, then served by the hot shard
    assert sum(read.values()) == len(ids), read  # each row read once


def test_the_migrator_rests_while_nobody_reads(make_cluster):
    """Planning over every row seen costs tens of ms: without reads (and nothing left to move) the
    migrator plans nothing, whatever its interval, and starts again with the next reads."""
    import time

    cluster = make_cluster(1, num_hot=1, hot_rows=64, migrate_interval_s=0.005, migrate_max_duty=1.0)
    rounds = lambda: ray.get(cluster.hot_actors[0].migration_counters.remote())["rounds"]
    with cluster.client() as client:
        client.create_table(TableConfig("rest", 1000, WIDTH))
        client.fetch({"rest": np.arange(100)})
        time.sleep(0.5)  # the reads are planned for
        resting = rounds()
        time.sleep(1.5)  # 300 intervals
        assert rounds() == resting > 0
        for _ in range(40):
            client.fetch({"rest": np.arange(100)})
            time.sleep(0.05)
        assert rounds() > resting
