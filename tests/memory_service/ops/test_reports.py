"""Utilization stats: known traffic at 2 real shards, the Stats rpc's counts and imbalance checked
exactly, latencies as plausible ranges; and the recent-window arithmetic of ShardMetrics."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.ops.metrics import LATENCY_BUCKETS, ShardMetrics, quantile
from memory_service.ops.reports import imbalance
from memory_service.storage.usage import DRAM_TIER

WIDTH = 4
NUM_FETCHES, NUM_PUSHES = 5, 3
FETCH_IDS = np.array([0, 2, 4, 6, 1, 3])  # 4 ids of shard 0 (even), 2 of shard 1 (odd)
PUSH_IDS = np.array([0, 2, 1, 2])  # shard 0: {0, 2} (2 repeated), shard 1: {1}
LAST_FETCH = np.array([0, 2, 4, 1, 3])  # after the pushes: shard 0 finds 0 and 2, shard 1 finds 1


def drive(client, name: str) -> None:
    for _ in range(NUM_FETCHES):
        client.fetch({name: FETCH_IDS})
    for step in range(1, NUM_PUSHES + 1):
        client.push({name: (PUSH_IDS, np.ones((len(PUSH_IDS), WIDTH), np.float32))}, step=step)
    client.fetch({name: LAST_FETCH})


def test_known_traffic_at_two_shards(make_cluster):
    cluster = make_cluster(2)
    cfg = TableConfig(name="util", num_rows=1000, width=WIDTH,
                      optimizer=OptimizerConfig(kind="adagrad", lr=0.1))
    with cluster.client(direct_reads=False) as client:  # Fetch rpcs: the rpc windows hold every read
        client.create_table(cfg)
        drive(client, cfg.name)
        report = client.report()
    s0, s1 = report.shards
    # Per shard: fetches carry each shard's distinct ids once; pushes their distinct ids once.
    assert (s0.counters.fetch_requests, s0.counters.fetch_rows) == (NUM_FETCHES + 1, 4 * NUM_FETCHES + 3)
    assert (s1.counters.fetch_requests, s1.counters.fetch_rows) == (NUM_FETCHES + 1, 2 * NUM_FETCHES + 2)
    assert (s0.counters.push_requests, s0.counters.push_rows) == (NUM_PUSHES, 2 * NUM_PUSHES)
    assert (s1.counters.push_requests, s1.counters.push_rows) == (NUM_PUSHES, 1 * NUM_PUSHES)
    # The window holds all of it (the test takes seconds, the window a minute).
    for shard in (s0, s1):
        c = shard.counters
        assert (shard.fetch.requests, shard.fetch.rows) == (c.fetch_requests, c.fetch_rows)
        assert (shard.push.requests, shard.push.rows) == (c.push_requests, c.push_rows)
        assert shard.fetch.errors == shard.push.errors == 0
    assert (s0.load, s1.load) == (4 * NUM_FETCHES + 3 + 2 * NUM_PUSHES, 2 * NUM_FETCHES + 2 + NUM_PUSHES)
    assert report.load_imbalance == pytest.approx(29 / ((29 + 15) / 2), rel=1e-12)
    # Rows: shard 0 stores ids 0 and 2, shard 1 id 1.
    assert (s0.rows, s1.rows) == (2, 1)
    assert report.rows_imbalance == pytest.approx(2 / 1.5, rel=1e-12)
    t0, t1 = s0.tables[0], s1.tables[0]
    assert (t0.step, t1.step) == (NUM_PUSHES, NUM_PUSHES)
    assert [(t.tier, t.rows, t.hits) for t in t0.tiers] == [(DRAM_TIER, 2, 2)]
    assert [(t.tier, t.rows, t.hits) for t in t1.tiers] == [(DRAM_TIER, 1, 1)]
    assert (t0.rows_read, t1.rows_read) == (4 * NUM_FETCHES + 3, 2 * NUM_FETCHES + 2)
    # Adagrad keeps one sum of squares per value; the store's arenas start at 1024 rows.
    assert t0.optimizer_state_bytes == t1.optimizer_state_bytes == 1024 * WIDTH * 4
    table = report.tables()[0]
    assert table.rows == 3 and table.step == NUM_PUSHES and table.rows_imbalance == pytest.approx(2 / 1.5)
    assert table.hit_rate[DRAM_TIER] == pytest.approx(3 / (6 * NUM_FETCHES + 5))
    assert table.collisions is None  # collision stats off for this table
    # Latencies and rates: plausible ranges only (timings vary with the machine).
    for shard in (s0, s1):
        print(f"\nshard {shard.shard_id}: fetch p50/p99 {shard.fetch.p50_s * 1e3:.2f}/"
              f"{shard.fetch.p99_s * 1e3:.2f} ms, push {shard.push.p50_s * 1e3:.2f}/"
              f"{shard.push.p99_s * 1e3:.2f} ms; imbalance load {report.load_imbalance:.4f} "
              f"rows {report.rows_imbalance:.4f}")
        for w in (shard.fetch, shard.push):
            assert 10e-6 <= w.p50_s <= w.p99_s < 5.0
            assert 0 < w.window_s <= 60 and w.requests_per_s == pytest.approx(w.requests / w.window_s)
            assert w.rows_per_s == pytest.approx(w.rows / w.window_s)


def test_stats_bytes_match_describe_table(make_cluster):
    """A table's bytes in Stats (tiers plus optimizer state) are DescribeTable's nbytes."""
    cluster = make_cluster(2)
    cfg = TableConfig(name="bytes", num_rows=1000, width=WIDTH, optimizer=OptimizerConfig(kind="adam"))
    with cluster.client() as client:
        client.create_table(cfg)
        drive(client, cfg.name)
        from memory_service.rpc import memory_pb2

        described = [stub.DescribeTable(memory_pb2.DescribeTableRequest(name=cfg.name)) for stub in client.stubs]
        report = client.report()
    for shard, info in zip(report.shards, described):
        assert shard.tables[0].bytes == info.nbytes
        assert shard.tables[0].rows == info.rows_materialized


def test_imbalance_definition():
    assert imbalance([2, 1]) == pytest.approx(4 / 3)
    assert imbalance([5, 5, 5]) == 1.0
    assert imbalance([0, 0]) is None


def test_window_rates_and_expiry():
    now = [1000.0]
    metrics = ShardMetrics(window_s=60, clock=lambda: now[0])
    for i in range(120):  # two calls a second for a minute
        now[0] = 1000.0 + i / 2
        metrics.observe("fetch", 0.001, rows=10)
    w = metrics.window("fetch")
    assert (w.requests, w.rows) == (120, 1200) and w.window_s == pytest.approx(59.5)
    now[0] += 30  # half the window later: the first half of the calls fell out
    w = metrics.window("fetch")
    assert w.requests == 60 and w.window_s == 60  # seconds 1030..1059 remain
    now[0] += 61
    assert metrics.window("fetch").requests == 0 and metrics.window("fetch").p99_s == 0.0
    buckets, total = metrics.histogram("fetch")
    assert buckets[-1] == ("+Inf", 120) and total == pytest.approx(0.12)


def test_quantiles_within_a_bucket_width():
    rng = np.random.default_rng(0)
    latencies = np.exp(rng.uniform(np.log(50e-6), np.log(0.5), size=20_000))
    metrics = ShardMetrics()
    for x in latencies:
        metrics.observe("push", float(x), rows=1)
    w = metrics.window("push")
    for got, q in ((w.p50_s, 50), (w.p99_s, 99)):
        assert got == pytest.approx(np.percentile(latencies, q), rel=0.2)
    assert quantile([0] * (len(LATENCY_BUCKETS) + 1), 0.5) == 0.0
