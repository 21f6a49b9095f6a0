"""`engram stats` in its own process against real shards (two cold, one hot): JSON equal to the
client's report, the terminal tables with each shard's role, in 80 columns where there is no
terminal, attaching through Ray by cluster name, and --watch streaming until Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import ray

from memory_service.config import TableConfig


def engram(*args: str, timeout: float = 120, columns: str | None = "200") -> str:
    """stdout of `engram ARGS` (no terminal: rich lays out for $COLUMNS, or 80 without it)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**env, "COLUMNS": columns} if columns else env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def busy_cluster(make_cluster):
    cluster = make_cluster(2, num_hot=1, migrate_interval_s=3600.0)  # a hot shard that stays empty
    with cluster.client() as client:
        client.create_table(TableConfig(name="alpha", num_rows=1000, width=4, collision_sample_rate=0.5))
        client.create_table(TableConfig(name="beta", num_rows=500, width=2))
        ids = np.arange(40)
        client.fetch({"alpha": ids, "beta": ids},
                     ngrams={"alpha": (ids % 7).astype(np.uint64)})
        client.push({"alpha": (ids, np.ones((40, 4), np.float32))}, step=1)
    return cluster


def test_json_matches_the_client_report(busy_cluster):
    out = json.loads(engram("stats", "--targets", ",".join(busy_cluster.targets), "--json"))
    with busy_cluster.client() as client:
        expected = client.report().to_json()
    assert out["num_shards"] == 2
    assert out["load_imbalance"] == expected["load_imbalance"]
    assert out["rows_imbalance"] == expected["rows_imbalance"]
    # --targets names the cold shards
    assert [s["counters"] for s in out["shards"]] == [s["counters"] for s in expected["shards"][:2]]
    assert [(s["role"], s["shard_id"]) for s in expected["shards"]] == [("cold", 0), ("cold", 1), ("hot", 0)]
    assert [s["wal_replayed"] for s in out["shards"]] == [0, 0]  # no restart (tests/memory_service/shard/test_recovery.py: > 0)
    assert [t["name"] for t in out["tables"]] == ["alpha", "beta"]
    alpha = out["tables"][0]
    assert alpha["rows"] == 40 and alpha["step"] == 1
    assert alpha["collisions"]["exact"] and alpha["collisions"]["lookups"] == 40
    assert out["tables"][1]["collisions"] is None


def test_terminal_tables_through_ray_by_name(busy_cluster):
    address = ray.get_runtime_context().gcs_address
    out = engram("stats", "--address", address, "--name", busy_cluster.config.name, "--table", "alpha")
    assert "shards" in out and "imbalance (max/mean over shards of a role)" in out and "log replayed" in out
    assert "alpha" in out and "beta" not in out  # --table filters
    assert "40 / 1,000" in out  # rows stored / table rows
    assert all(label in out for label in ("cold 0", "cold 1", "hot 0"))


def test_terminal_tables_fit_80_columns_without_a_terminal(busy_cluster):
    """As under `kubectl exec` without a TTY: no $COLUMNS, rich assumes 80; nothing cut short."""
    address = ray.get_runtime_context().gcs_address
    out = engram("stats", "--address", address, "--name", busy_cluster.config.name, columns=None)
    print(out)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out
    assert all(label in out for label in ("cold 0", "cold 1", "hot 0", "alpha", "beta"))


def test_watch_streams_until_interrupted(busy_cluster):
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "stats", "--targets",
                             ",".join(busy_cluster.targets), "--json", "--watch", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        with busy_cluster.client() as client:
            client.fetch({"beta": np.arange(10)})
        # the next documents show the new fetch (one document may predate it)
        for _ in range(3):
            latest = json.loads(proc.stdout.readline())
        fetched = [sum(s["counters"]["fetch_requests"] for s in doc["shards"]) for doc in (first, latest)]
        assert fetched[1] == fetched[0] + 2  # one request per shard
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
