"""Durable hot shards (issue 22): with a disk directory a hot shard keeps its rows in LMDB under a
write-ahead log (`hot-NNNN`, beside the cold shards' `shard-NNNN`), Ray restarts it after a crash
on its port, and its migrator finishes the move the crash cut in half, so a kill -9 of the hot
shard mid-training loses nothing: every table equals an uninterrupted run's exactly, and drivers
that attach while it restarts (`connect`, `engram stats`) wait for it rather than fail."""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.wire.retry import RetryPolicy
from tests.memory_service.shard.test_recovery import assert_same_tables, cold_cluster, rows_of


@pytest.mark.slow
def test_kill_9_of_the_hot_shard_mid_training_loses_nothing(make_cluster, corpus_dir, tmp_path):
    """Training through 2 cold + 1 hot shards (all LMDB-backed; the hot shard's small capacity
    keeps rows moving both ways) while the hot shard's process is killed with SIGKILL as step 12's
    push reaches it, after rows migrated to it: Ray restarts it, it replays its log, the clients
    re-send, migration goes on, and every table's rows and optimizer state equal an uninterrupted
    run's."""
    import ray

    from trainer.data import Corpus
    from trainer.train import ServiceOptions, train
    from tests.trainer.test_train import small_train_config

    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=25, warmup_steps=3,
                  table_optimizer="sparse_adam", table_lr_mult=5.0, threads=1)
    corpus = Corpus.load(cfg.corpus)
    service = ServiceOptions(prefix="hotkill", lookahead=True)
    hot = dict(num_hot=1, hot_rows=128, migrate_interval_s=0.01, migrate_max_duty=1.0)

    calm = cold_cluster(make_cluster, tmp_path / "calm", **hot)
    with calm.client() as client:
        want = train(cfg, corpus, client=client, service=service)
        names = sorted(t.name for t in client.report().shards[0].tables)
    want_rows = rows_of(calm, names)

    crashing = cold_cluster(make_cluster, tmp_path / "crash", **hot)
    victim = crashing.hot_actors[0]
    pid = ray.get(victim.pid.remote())
    killed: dict = {}

    def kill_on_push(event: str, fields: dict) -> None:  # as the push reaches the hot shard (index 2)
        if event == "push_sent" and fields["step"] == 12 and fields["shard"] == 2 and not killed:
            killed["before"] = ray.get(victim.migration_counters.remote())
            threading.Timer(0.002, os.kill, (pid, signal.SIGKILL)).start()

    with crashing.client(retry=RetryPolicy(deadline_s=60.0)) as client:
        client.trace = kill_on_push
        got = train(cfg, corpus, client=client, service=service)
        retries = client.retries
    new_pid, recovered = ray.get(victim.pid.remote()), ray.get(victim.recovery.remote())
    after = ray.get(victim.migration_counters.remote())
    print(f"kill -9 of hot shard pid {pid} at step 12 (migration before: {killed.get('before')}): restarted as "
          f"pid {new_pid}, {recovered['wal_replayed']} write-ahead log records replayed, {retries} client "
          f"retries; migration since: {after}")
    assert killed and killed["before"]["promoted"] > 0, killed  # rows had moved to it
    assert new_pid != pid
    assert retries > 0 and recovered["wal_replayed"] > 0
    assert after["promoted"] + after["demoted"] > 0 and not after["error"], after  # the migrator went on
    assert got.train_losses == want.train_losses
    assert_same_tables(rows_of(crashing, names), want_rows)
    assert sorted(os.listdir(tmp_path / "crash")) == ["hot-0000", "shard-0000", "shard-0001"]


def test_connect_stats_and_fetch_ride_through_a_hot_shard_restart(make_cluster, tmp_path):
    """kill -9 of a hot shard that holds rows: at once a new driver attaches (`connect`, as `engram
    stats` does), reads every shard's stats and fetches the hot rows; each waits for the restart
    and gets the rows as they were."""
    import ray

    from memory_service.cluster import connect

    cluster = make_cluster(2, num_hot=1, hot_rows=64, migrate_interval_s=0.005, migrate_max_duty=1.0,
                           storage=StorageConfig(path=str(tmp_path)))
    table = TableConfig(name="h", num_rows=1000, width=4, optimizer=OptimizerConfig(lr=0.1))
    ids = np.arange(0, 1000, 25)
    victim = cluster.hot_actors[0]
    with cluster.client() as client:
        client.create_table(table)
        deadline, step = time.monotonic() + 60, 0
        while len(ray.get(victim.table_state.remote("h"))["ids"]) == 0:
            assert time.monotonic() < deadline, "no row was promoted"
            step += 1
            client.fetch({"h": ids}, min_step=step - 1)
            client.push({"h": (ids, np.full((len(ids), 4), step, np.float32))}, step=step)
        rows = client.fetch({"h": ids}, min_step=step)["h"].numpy()
    pid = ray.get(victim.pid.remote())
    os.kill(pid, signal.SIGKILL)
    again = connect(name=cluster.config.name)  # while the hot shard restarts
    with again.client() as client:
        report = client.report()
        np.testing.assert_array_equal(client.fetch({"h": ids}, min_step=step)["h"].numpy(), rows)
    assert sorted(s.role for s in report.shards) == ["cold", "cold", "hot"]
    assert ray.get(victim.pid.remote()) != pid and ray.get(victim.recovery.remote())["wal_replayed"] > 0
