"""Shards as Ray actors behind gRPC: optimizer parity with torch through the whole service,
lazy init independent of sharding, memory of a 100M-row table, errors, and `engram serve`."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import torch

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import InvalidArgument, TableExists, TableNotFound
from memory_service.rows import init_rows

NUM_ROWS, WIDTH = 512, 8


def torch_optimizer(kind: str, params, cfg: OptimizerConfig):
    if kind == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps)
    return torch.optim.SGD(params, lr=cfg.lr)


@pytest.fixture(scope="module")
def cluster_of(make_cluster):
    """cluster_of(n): one n-shard cluster per n, shared by this module's tests."""
    cache = {}

    def get(num_shards: int):
        if num_shards not in cache:
            cache[num_shards] = make_cluster(num_shards)
        return cache[num_shards]

    return get


def counters(cluster) -> list[dict]:
    return ray.get([a.counters.remote() for a in cluster.actors])


def digests(cluster) -> list[str]:
    return ray.get([a.digest.remote() for a in cluster.actors])


@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("kind", ["sparse_adam", "adagrad", "sgd"])
def test_server_optimizer_equals_torch(cluster_of, num_shards, kind):
    cluster = cluster_of(num_shards)
    opt_cfg = OptimizerConfig(kind=kind, lr=0.05, eps=1e-8)
    cfg = TableConfig(name=f"parity-{kind}-{num_shards}", num_rows=NUM_ROWS, width=WIDTH, init_scale=0.1,
                      seed=5, optimizer=opt_cfg)
    emb = torch.nn.Embedding(NUM_ROWS, WIDTH, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(init_rows(5, np.arange(NUM_ROWS), WIDTH, 0.1)))
    opt = torch_optimizer(kind, list(emb.parameters()), opt_cfg)
    before = counters(cluster)
    rng = np.random.default_rng(0)
    with cluster.client() as client:
        client.create_table(cfg)
        for step in range(1, 21):
            ids = rng.integers(0, 200, size=96)  # many duplicates
            grads = rng.standard_normal((96, WIDTH)).astype(np.float32)
            opt.zero_grad()
            (emb(torch.from_numpy(ids)) * torch.from_numpy(grads)).sum().backward()
            opt.step()
            client.push({cfg.name: (ids, grads)}, step=step)
        served = client.fetch({cfg.name: np.arange(NUM_ROWS)})[cfg.name]
    torch.testing.assert_close(served, emb.weight.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(served, torch.from_numpy(init_rows(5, np.arange(NUM_ROWS), WIDTH, 0.1)))
    after = counters(cluster)
    # the shards themselves did the work: a silent local fallback cannot pass
    assert sum(a["push_requests"] - b["push_requests"] for a, b in zip(after, before)) >= 20
    assert sum(a["fetch_rows"] - b["fetch_rows"] for a, b in zip(after, before)) >= NUM_ROWS
    assert all(a["push_rows"] > b["push_rows"] for a, b in zip(after, before))


def test_lazy_init_identical_across_shardings(cluster_of):
    one, three = cluster_of(1), cluster_of(3)
    cfg = TableConfig(name="lazy", num_rows=10_000, width=16, init_scale=0.3, seed=42)
    ids = np.random.default_rng(1).integers(0, 10_000, size=(4, 50))
    rows = []
    for cluster in (one, three):
        with cluster.client() as client:
            client.create_table(cfg)
            rows.append(client.fetch({"lazy": ids})["lazy"])
    assert rows[0].shape == (4, 50, 16)
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=0)
    expected = init_rows(42, ids.reshape(-1), 16, 0.3).reshape(4, 50, 16)
    np.testing.assert_array_equal(rows[0].numpy(), expected)


def test_100m_row_table_stays_small(cluster_of):
    cluster = cluster_of(2)
    cfg = TableConfig(name="huge", num_rows=100_000_000, width=64, init_scale=0.02, seed=1)
    ids = np.random.default_rng(2).choice(100_000_000, size=10_000, replace=False)
    with cluster.client() as client:
        client.create_table(cfg)
        rows = client.fetch({"huge": ids})["huge"]
        client.push({"huge": (ids, np.ones((10_000, 64), np.float32))}, step=1)
        moved = client.fetch({"huge": ids})["huge"]
    assert rows.shape == (10_000, 64) and not torch.equal(rows, moved)
    rss = ray.get([a.rss_bytes.remote() for a in cluster.actors])
    print("shard anonymous RSS MiB:", [round(r / 2**20) for r in rss])
    assert max(rss) < 500 * 2**20


@pytest.fixture(scope="module")
def loaded(make_cluster):
    """A 2-shard cluster whose table already holds rows and Adam state."""
    cluster = make_cluster(2)
    cfg = TableConfig(name="t", num_rows=100, width=4, optimizer=OptimizerConfig(lr=0.1))
    client = cluster.client()
    client.create_table(cfg)
    client.push({"t": (np.arange(0, 100, 3), np.ones((34, 4), np.float32))}, step=1)
    yield cluster, client
    client.close()


@pytest.mark.parametrize("request_kind, error, message", [
    ("out_of_range", InvalidArgument, "table 't': row id 100 out of range [0, 100)"),
    ("negative", InvalidArgument, "row id -1 out of range [0, 100)"),
    ("unknown_table", TableNotFound, "table 'nope' not found"),
    ("recreate", TableExists, "table 't'"),
    ("push_out_of_range", InvalidArgument, "row id 100 out of range [0, 100)"),
])
def test_rejected_requests_change_nothing(loaded, request_kind, error, message):
    cluster, client = loaded
    before = digests(cluster)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        if request_kind == "out_of_range":
            client.fetch({"t": np.array([5, 100])})
        elif request_kind == "negative":
            client.fetch({"t": np.array([-1, 5])})
        elif request_kind == "unknown_table":
            client.fetch({"nope": np.array([1])})
        elif request_kind == "recreate":
            client.create_table(TableConfig(name="t", num_rows=100, width=8))
        elif request_kind == "push_out_of_range":
            client.push({"t": (np.array([1, 2, 100]), np.ones((3, 4), np.float32))}, step=2)
    assert digests(cluster) == before
    client.push({"t": (np.array([1, 2]), np.ones((2, 4), np.float32))}, step=2)
    assert digests(cluster) != before


def test_engram_serve_process(tmp_path):
    """`engram serve` in its own process; a client here fetches and pushes; SIGTERM and SIGINT stop it."""
    from memory_service.client import MemoryClient

    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "serve", "--shards", "2",
                                 "--name", f"serve{sig}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "RAY_ADDRESS": ""})
        targets, lines = [], []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("shard "):
                targets.append(line.split(": ")[1].strip())
            if line.startswith("serving") or not line:
                break
        assert len(targets) == 2, "".join(lines)
        with MemoryClient(targets) as client:
            client.create_table(TableConfig(name="s", num_rows=1000, width=4))
            assert client.push({"s": (np.array([1, 2, 3]), np.ones((3, 4), np.float32))}, step=1) == 3
            assert client.fetch({"s": np.array([[1, 2, 3]])})["s"].shape == (1, 3, 4)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopped" in out


def test_connect_finds_shards_through_the_registry(make_cluster):
    """A second driver attaches by cluster name and reaches the same shards (owning nothing)."""
    from memory_service.cluster import connect

    cluster = make_cluster(2)
    attached = connect("ignored-when-ray-is-running", name=cluster.config.name)
    assert attached.targets == cluster.targets and not attached.owns_actors
    cfg = TableConfig(name="via-registry", num_rows=64, width=4)
    with attached.client() as client:
        client.create_table(cfg)
        client.push({cfg.name: (np.arange(8), np.ones((8, 4), np.float32))}, step=1)
    with cluster.client() as client:
        assert client.fetch({cfg.name: np.arange(8)})[cfg.name].shape == (8, 4)
    attached.shutdown()  # detaches only: the shards still serve
    with cluster.client() as client:
        assert client.table(cfg.name).num_rows == 64


def test_shards_run_at_the_configured_niceness(make_cluster):
    """Shards sharing a host with a trainer yield the CPU to it: every thread that serves or
    migrates (created after the actor set its priority) runs at `niceness`."""
    import os

    import ray

    from memory_service.cluster import ClusterConfig

    with pytest.raises(ValueError, match="niceness"):
        ClusterConfig(niceness=20)
    cluster = make_cluster(1, num_hot=1, niceness=7)
    for actor in [*cluster.actors, *cluster.hot_actors]:
        pid = ray.get(actor.pid.remote())
        nice = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                nice[f"{f.read().strip()}:{tid}"] = int(fields[16])  # field 19 of stat: nice
        python = [n for name, n in nice.items() if name.startswith("ray::ShardActor")]  # main + handlers
        assert os.getpriority(os.PRIO_PROCESS, pid) == 7 and len(python) > 1 and set(python) == {7}, nice
