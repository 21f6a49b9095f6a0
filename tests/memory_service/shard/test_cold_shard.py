"""A cold shard (Shard with a StorageConfig path): rows in LMDB under a DRAM budget, placement on
its background thread, fetches held for their step (the look-ahead), stats per tier, and the
shard reopened from its directory continuing bit-identically; the same through Ray actors."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.errors import InvalidArgument
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.storage.usage import DISK_TIER, DRAM_TIER

TABLES = [
    TableConfig("dense", 6000, 16, init_scale=0.1, seed=1,
                optimizer=OptimizerConfig("adam", lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6)),
    TableConfig("lazy", 6000, 8, init_scale=0.1, seed=2,
                optimizer=OptimizerConfig("sparse_adam", lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6)),
]


def storage(path, budget: int = 48 << 10) -> StorageConfig:
    """~100 rows of each table in DRAM: placement keeps moving rows."""
    return StorageConfig(path=str(path), dram_budget_bytes=budget, placement_interval_s=0.002, max_moves=32)


def shard_ids(rng, n: int) -> np.ndarray:
    """Ids of shard 0 of 2 (even), 70% from a hot set of 100."""
    return 2 * np.where(rng.random(n) < 0.7, rng.integers(0, 100, n), rng.integers(0, 3000, n))


def drive(shards: list[Shard], steps: range, seed: int = 0) -> None:
    """Per step, as the trainer does: the step's fetch is sent before the previous step's push
    (held until that push arrives: min_step, whose ids the shard announces to its placement
    policy), then gradients of those rows are pushed. Every fetch must return the same rows on
    every shard."""
    rng = np.random.default_rng(seed)
    pending: dict[str, TablePush] = {}
    for step in steps:
        ids = shard_ids(rng, 150)
        replies: list[dict] = [{} for _ in shards]
        readers = [threading.Thread(target=lambda s=s, r=r: r.update(
            s.fetch({t.name: ids for t in TABLES}, min_step=step - 1, timeout=30))) for s, r in zip(shards, replies)]
        for reader in readers:
            reader.start()
        for s in shards:
            if pending:
                s.push("c", pending)
        for reader in readers:
            reader.join(30)
        for name in (t.name for t in TABLES):
            for other in replies[1:]:
                np.testing.assert_array_equal(other[name], replies[0][name])
        pending = {t.name: TablePush(step, ids, rng.standard_normal((len(ids), t.width)).astype(np.float32),
                                     lr=0.05 * 0.97**step) for t in TABLES}
    for s in shards:
        s.push("c", pending)


def cold_shard(path, **kwargs) -> Shard:
    shard = Shard(0, 2, storage(path, **kwargs))
    for cfg in TABLES:
        shard.create_table(cfg)
    return shard


def test_cold_shard_reopens_from_lmdb_and_continues_bit_identically(tmp_path):
    reference = Shard(0, 2)
    for cfg in TABLES:
        reference.create_table(cfg)
    shard = cold_shard(tmp_path)
    try:
        drive([shard, reference], range(1, 31))
        assert shard.placer.passes > 0 and shard.placer.error is None
        usage = {t.name: t for t in shard.usage()}
        assert shard.digest() == reference.digest()
    finally:
        shard.close()
    memory = usage["dense"].tiers[0]
    assert memory.promotions > 0 and memory.demotions > 0 and memory.hits > 0
    assert shard._tables["dense"].arena_counters.writebacks > 0

    reopened = Shard(0, 2, storage(tmp_path))
    try:
        assert reopened.list_tables() == sorted(t.name for t in TABLES)
        for cfg in TABLES:
            info, expected = reopened.describe_table(cfg.name), reference.describe_table(cfg.name)
            assert (info.config, info.step, info.rows_materialized) == (expected.config, expected.step,
                                                                       expected.rows_materialized)
            reopened.create_table(cfg)  # the same config: a no-op
        assert reopened.digest() == reference.digest()
        drive([reopened, reference], range(31, 41), seed=1)
        assert reopened.digest() == reference.digest()
    finally:
        reopened.close()
    with pytest.raises(InvalidArgument, match="holds shard 0 of 2, not shard 1 of 2"):
        Shard(1, 2, storage(tmp_path))


def test_usage_reports_dram_over_disk(tmp_path):
    shard = cold_shard(tmp_path)
    try:
        drive([shard], range(1, 11))
        assert shard.placer.wait_passes(2)
        with shard._lock:  # placement is running: look at the stores between its batches
            for table in (shard._usage(shard._tables[name]) for name in sorted(shard._tables)):
                memory, cold = table.tiers
                assert (memory.tier, cold.tier) == (DRAM_TIER, DISK_TIER)
                store = shard._tables[table.name]
                assert cold.rows == store.num_materialized == table.rows > memory.rows > 0
                assert memory.rows <= store.arena.max_rows < 200  # the budget's share of DRAM
                assert memory.hits + memory.misses == table.rows_read == 10 * 150
                assert memory.misses == cold.hits + cold.misses
                assert memory.promotions > 0 and cold.bytes > 0 and memory.dirty_rows == store.arena.num_dirty
                assert table.bytes == memory.bytes + cold.bytes + table.optimizer_state_bytes
    finally:
        shard.close()


def test_dropped_table_leaves_the_lmdb_files(tmp_path):
    shard = cold_shard(tmp_path)
    drive([shard], range(1, 4))
    shard.drop_table("dense")
    digest = shard.digest()  # of "lazy" alone (under the shard's lock: placement is running)
    shard.close()
    reopened = Shard(0, 2, storage(tmp_path))
    try:
        assert reopened.list_tables() == ["lazy"]
        assert reopened.digest() == digest
        reopened.create_table(TABLES[0])
        assert reopened.describe_table("dense").rows_materialized == 0
    finally:
        reopened.close()


def test_cold_shards_as_ray_actors_each_own_a_directory(ray_session, tmp_path):
    """ClusterConfig.storage reaches each actor with a subdirectory of its own; stopping the
    cluster closes the shards, and each directory reopens to the digest its actor reported."""
    import ray

    from memory_service.cluster import ClusterConfig, launch

    config = ClusterConfig(num_shards=2, name="cold-actors", storage=storage(tmp_path))
    cluster = launch(config)
    try:
        rng = np.random.default_rng(0)
        with cluster.client() as client:
            client.create_table(TABLES[1])
            for step in range(1, 6):
                ids = rng.integers(0, 6000, 300)
                client.fetch({"lazy": ids})
                client.push({"lazy": (ids, np.ones((300, 8), np.float32))}, step=step)
            report = client.report()
        digests = ray.get([a.digest.remote() for a in cluster.actors])
    finally:
        cluster.shutdown()
    for shard in report.shards:
        assert [t.tier for t in shard.tables[0].tiers] == [DRAM_TIER, DISK_TIER]
    for i, digest in enumerate(digests):
        assert (tmp_path / f"shard-{i:04d}" / "data.mdb").exists()
        reopened = Shard(i, 2, config.storage.for_shard(i))
        try:
            assert reopened.digest() == digest
        finally:
            reopened.close()


def test_storage_config_is_checked():
    with pytest.raises(ValueError, match="dram_budget_bytes -1 must be >= 0"):
        StorageConfig(path="x", dram_budget_bytes=-1)
    with pytest.raises(ValueError, match="placement_interval_s 0 must be > 0"):
        StorageConfig(path="x", placement_interval_s=0)
    with pytest.raises(ValueError, match="map_bytes 1024 must be >= 1 MiB"):
        StorageConfig(path="x", map_bytes=1024)
    assert StorageConfig(path="/d").for_shard(3).path == "/d/shard-0003"
    assert StorageConfig().for_shard(3).path is None


def test_unknown_policy_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="belady"):
        Shard(0, 1, StorageConfig(path=str(tmp_path), policy="belady"))
