"""MemoryClient against real shard actors: shared-memory and gRPC replies agree, the fallback when a
shard cannot open the reply file, request splitting, several tables per call, async fetch."""
import os

import numpy as np
import pytest
import ray
import torch

from memory_service.wire import reply_files
from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import InvalidArgument
from memory_service.rows import init_rows

TABLES = [TableConfig(name="f32", num_rows=5000, width=12, init_scale=0.5, seed=3),
          TableConfig(name="b16", num_rows=7001, width=8, dtype="bfloat16", seed=4,
                      optimizer=OptimizerConfig(kind="sgd", lr=0.5))]


@pytest.fixture(scope="module")
def cluster(make_cluster):
    cluster = make_cluster(3)
    with cluster.client() as client:
        for cfg in TABLES:
            client.create_table(cfg)
        client.push({"f32": (np.arange(0, 5000, 7), np.ones((715, 12), np.float32)),
                     "b16": (np.arange(0, 7001, 5), np.ones((1401, 8), np.float32))}, step=1)
    return cluster


def sample_ids(seed=0):
    rng = np.random.default_rng(seed)
    return {"f32": rng.integers(0, 5000, size=(3, 2000)), "b16": rng.integers(0, 7001, size=3000)}  # > MIN_REPLY_BYTES


def fetch_requests(cluster) -> int:
    return sum(c["fetch_requests"] for c in ray.get([a.counters.remote() for a in cluster.actors]))


def test_shared_memory_and_grpc_replies_agree(cluster):
    ids = sample_ids()
    with MemoryClient(cluster.targets) as shm, MemoryClient(cluster.targets, shared_memory=False) as wire_only:
        assert shm.replies is not None and wire_only.replies is None
        a, b = shm.fetch(ids), wire_only.fetch(ids)
    for name in ids:
        assert a[name].shape == (*ids[name].shape, shm.table(name).width) and a[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # untouched rows are the init function's; bf16 rows are its values rounded to bf16
    untouched = ids["f32"][ids["f32"] % 7 != 0]
    expected = init_rows(3, untouched, 12, 0.5)
    np.testing.assert_array_equal(a["f32"][torch.from_numpy(ids["f32"] % 7 != 0)].numpy(), expected)
    b16 = ids["b16"][ids["b16"] % 5 != 0]
    rounded = torch.from_numpy(init_rows(4, b16, 8, 1.0)).to(torch.bfloat16).float()
    torch.testing.assert_close(a["b16"][torch.from_numpy(ids["b16"] % 5 != 0)], rounded, rtol=0, atol=0)


class UnlinkedReplies(reply_files.ReplyBufferPool):
    """Reply files whose path is gone as soon as they exist: what a shard on another host sees."""

    def acquire(self, size):
        buf = super().acquire(size)
        if os.path.exists(buf.path):
            os.unlink(buf.path)
        return buf


def test_falls_back_to_grpc_when_shard_cannot_open_the_reply_file(cluster):
    ids = sample_ids(1)
    with MemoryClient(cluster.targets, shared_memory=False) as reference:
        expected = reference.fetch(ids)
    with MemoryClient(cluster.targets, direct_reads=False) as client:  # the Fetch rpc's reply files
        client.replies = UnlinkedReplies()
        got = client.fetch(ids)
        assert client.same_host == [False, False, False]
        again = client.fetch(ids)  # later calls go straight to gRPC
    for name in ids:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
        torch.testing.assert_close(again[name], expected[name], rtol=0, atol=0)


def test_large_batches_are_split(cluster):
    ids = np.arange(5000)
    with MemoryClient(cluster.targets, max_rows_per_request=250, direct_reads=False) as client:  # Fetch rpcs
        before = fetch_requests(cluster)
        rows = client.fetch({"f32": ids})["f32"]
        assert fetch_requests(cluster) - before >= 5000 // 250
        with MemoryClient(cluster.targets) as whole:
            torch.testing.assert_close(rows, whole.fetch({"f32": ids})["f32"], rtol=0, atol=0)


def test_fetch_async_and_validation(cluster):
    ids = sample_ids(2)
    with cluster.client() as client:
        future = client.fetch_async(ids)
        rows = future.result(timeout=60)
        torch.testing.assert_close(rows["f32"], client.fetch(ids)["f32"], rtol=0, atol=0)
        with pytest.raises(InvalidArgument, match=r"table 'f32': row id 5000 out of range \[0, 5000\)"):
            client.fetch({"f32": np.array([1, 5000])})
        with pytest.raises(InvalidArgument, match="row ids must be integers"):
            client.fetch({"f32": np.array([1.5])})
        with pytest.raises(InvalidArgument, match="gradient width 3 != table width 12"):
            client.push({"f32": (np.array([1]), np.ones((1, 3), np.float32))}, step=2)


def test_reply_files_refuse_paths_outside_shared_memory(tmp_path):
    files = reply_files.ReplyFiles()
    with pytest.raises(InvalidArgument, match="must be /dev/shm/engram-reply-"):
        files.open(str(tmp_path / "engram-reply-x"))
    with pytest.raises(InvalidArgument, match="must be /dev/shm/engram-reply-"):
        files.open("/dev/shm/other-file")
    buf = reply_files.ReplyBuffer(1 << 20)
    try:
        with pytest.raises(InvalidArgument, match="does not fit"):
            files.write(buf.path, [(0, np.ones((10, 4), np.float32), "float32"),
                                   (buf.size - 8, np.ones((10, 4), np.float32), "float32")])
        assert not buf.view(0, 160).any()  # the fitting part was not written either
    finally:
        buf.close()
