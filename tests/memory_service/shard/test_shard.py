"""Shard: the public edge. Whole requests validated before any change, duplicates summed,
torch parity across 1, 2 and 4 shards, counters that prove the shards did the work."""
import threading

import numpy as np
import pytest
import torch

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import InvalidArgument, TableExists, TableNotFound
from memory_service.rows import init_rows
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.sharding import split_by_shard

ADAM = OptimizerConfig("sparse_adam", lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6)
OPTIMIZERS = [ADAM, OptimizerConfig("adagrad", lr=0.1, eps=1e-7, initial_accumulator_value=0.1),
              OptimizerConfig("sgd", lr=0.1)]


def table(name="x", num_rows=100, width=64, optimizer=ADAM) -> TableConfig:
    return TableConfig(name, num_rows, width, init_scale=0.5, seed=9, optimizer=optimizer)


@pytest.fixture
def shard() -> Shard:
    """Shard 0 of 2 holding rows and Adam state in tables 'x' (width 64) and 'y' (width 8)."""
    shard = Shard(0, 2)
    shard.create_table(table("x"))
    shard.create_table(table("y", width=8))
    ids = np.array([0, 2, 4, 2])
    shard.push("c", {"x": TablePush(1, ids, np.ones((4, 64), np.float32)),
                     "y": TablePush(1, ids, np.ones((4, 8), np.float32))})
    return shard


def test_create_is_idempotent_and_conflicts_name_fields(shard):
    info = shard.create_table(table("x"))
    assert (info.step, info.rows_materialized) == (1, 3) and info.nbytes > 0
    assert shard.describe_table("x") == info
    lr2 = OptimizerConfig("sparse_adam", lr=0.1, beta1=0.8, beta2=0.99, eps=1e-6)
    with pytest.raises(TableExists, match=r"table 'x' exists with a different config: "
                                          r"width 64 != 32, optimizer.lr 0.05 != 0.1"):
        shard.create_table(table("x", width=32, optimizer=lr2))
    assert shard.list_tables() == ["x", "y"]


def test_drop(shard):
    shard.drop_table("x")
    assert shard.list_tables() == ["y"]
    with pytest.raises(TableNotFound, match="table 'x' not found on shard 0"):
        shard.describe_table("x")
    info = shard.create_table(table("x"))  # a new, untouched table of the same name
    assert info.step == 0 and info.rows_materialized == 0


def test_fetch_keeps_order_and_repeats(shard):
    ids = np.array([6, 0, 6, 98])
    rows = shard.fetch({"x": ids, "y": ids[:1]})
    assert rows["x"].shape == (4, 64) and rows["y"].shape == (1, 8)
    assert rows["x"].dtype == np.float32
    np.testing.assert_array_equal(rows["x"][[0, 2, 3]], init_rows(9, ids[[0, 2, 3]], 64, 0.5))
    assert not np.array_equal(rows["x"][1], init_rows(9, [0], 64, 0.5)[0])  # row 0 was pushed
    assert shard.counters.fetch_requests == 1 and shard.counters.fetch_rows == 5


def grads(n, width=64):
    return np.ones((n, width), np.float32)


BAD_FETCHES = [
    ({"z": np.array([0])}, TableNotFound, "table 'z' not found on shard 0"),
    ({"x": np.array([[0]])}, InvalidArgument, r"table 'x': row ids must be a 1-D integer array"),
    ({"x": np.array([0.0])}, InvalidArgument, r"table 'x': row ids must be a 1-D integer array"),
    ({"x": np.array([0, -2])}, InvalidArgument, r"table 'x': row id -2 out of range \[0, 100\)"),
    ({"x": np.array([100, 0, 102])}, InvalidArgument, r"row id 100 out of range \[0, 100\)"),
    ({"x": np.array([2**63], np.uint64)}, InvalidArgument, r"row id 9223372036854775808 out of"),
    ({"x": np.array([0, 3])}, InvalidArgument, "table 'x': row id 3 belongs to shard 1 of 2, "
                                               "not to shard 0"),
]
BAD_PUSHES = [
    ({"z": TablePush(2, np.array([0]), grads(1))}, TableNotFound, "table 'z' not found on shard 0"),
    ({"x": TablePush(2, np.array([100]), grads(1))}, InvalidArgument,
     r"table 'x': row id 100 out of range \[0, 100\)"),
    ({"x": TablePush(2, np.array([1]), grads(1))}, InvalidArgument, "row id 1 belongs to shard 1"),
    ({"x": TablePush(2, np.array([0]), grads(1, 32))}, InvalidArgument,
     "table 'x': gradient width 32 != table width 64"),
    ({"x": TablePush(2, np.array([0, 2]), grads(3))}, InvalidArgument,
     "table 'x': 3 gradient rows != 2 row ids"),
    ({"x": TablePush(2, np.array([0]), grads(1).ravel())}, InvalidArgument,
     "gradients must be a 2-D float array"),
    ({"x": TablePush(2, np.array([0, 2]), np.array([[0.0] * 64, [np.nan] * 64]))},
     InvalidArgument, "table 'x': gradient of row id 2 is not finite"),
    ({"x": TablePush(0, np.array([0]), grads(1))}, InvalidArgument, "table 'x': step 0 must be"),
    # Valid for 'x', invalid for 'y': neither table may change.
    ({"x": TablePush(2, np.array([0]), grads(1)), "y": TablePush(2, np.array([0]), grads(1))},
     InvalidArgument, "table 'y': gradient width 64 != table width 8"),
]


@pytest.mark.parametrize("request_, error, message", BAD_FETCHES)
def test_rejected_fetch_changes_nothing(shard, request_, error, message):
    digest, counters = shard.digest(), dict(vars(shard.counters))
    with pytest.raises(error, match=message):
        shard.fetch(request_)
    assert shard.digest() == digest and vars(shard.counters) == counters


@pytest.mark.parametrize("push, error, message", BAD_PUSHES)
def test_rejected_push_changes_nothing_and_a_valid_one_does(shard, push, error, message):
    digest, counters = shard.digest(), dict(vars(shard.counters))
    with pytest.raises(error, match=message):
        shard.push("c", push)
    assert shard.digest() == digest and vars(shard.counters) == counters
    assert shard.push("c", {"x": TablePush(2, np.array([0, 0]), grads(2))}) == 1
    assert shard.digest() != digest


def test_owns():
    shard = Shard(1, 3)
    assert shard.owns(np.array([1, 4, 301])) and not shard.owns(np.array([1, 2]))
    with pytest.raises(InvalidArgument, match=r"shard id 3 must be in \[0, 3\)"):
        Shard(3, 3)


def test_concurrent_pushes_all_land():
    """gRPC calls push from many threads; the lock makes each push whole (exact: 0.5 * 1.0)."""
    shard = Shard(0, 1)
    shard.create_table(table("x", optimizer=OptimizerConfig("sgd", lr=0.5)))
    ids = np.arange(100)

    def pushes():
        for _ in range(25):
            shard.push("t", {"x": TablePush(1, ids, grads(100))})

    threads = [threading.Thread(target=pushes) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = init_rows(9, ids, 64, 0.5).astype(np.float64)
    np.testing.assert_allclose(shard.fetch({"x": ids})["x"], start - 50, atol=1e-4)
    assert shard.counters.push_requests == 100 and shard.counters.push_rows == 10_000


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.kind)
def test_shards_match_torch(num_shards, optimizer):
    """20 steps of duplicate-laden gradients, each shard given its ids at the same table step,
    equal torch's optimizer on nn.Embedding(sparse=True) within 1e-6 of the table's scale."""
    cfg = table(num_rows=40, width=8, optimizer=optimizer)
    shards = [Shard(s, num_shards) for s in range(num_shards)]
    for shard in shards:
        shard.create_table(cfg)
    emb = torch.nn.Embedding(40, 8, sparse=True)
    start = init_rows(cfg.seed, np.arange(40), 8, cfg.init_scale)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(start))
    opt = {"sparse_adam": lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6),
           "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-7,
                                                    initial_accumulator_value=0.1),
           "sgd": lambda p: torch.optim.SGD(p, lr=0.1)}[optimizer.kind](emb.parameters())
    rng = np.random.default_rng(0)
    for step in range(1, 21):
        ids = rng.integers(0, 40, size=24)  # duplicates every step
        g = rng.standard_normal((24, 8)).astype(np.float32)
        opt.zero_grad()
        emb(torch.from_numpy(ids)).backward(torch.from_numpy(g))
        opt.step()
        for shard, pos in zip(shards, split_by_shard(ids, num_shards)):
            shard.push("trainer-0", {"x": TablePush(step, ids[pos], g[pos])})
    ids = np.arange(40)
    ours = np.empty((40, 8), np.float32)
    for shard, pos in zip(shards, split_by_shard(ids, num_shards)):
        ours[pos] = shard.fetch({"x": ids[pos]})["x"]
        assert shard.counters.push_requests == 20 and shard.counters.push_rows > 0
        assert shard.describe_table("x").step == 20
    assert sum(s.counters.push_rows for s in shards) == 20 * 24
    ref = emb.weight.detach().numpy()
    assert not np.allclose(ref, start, atol=1e-3)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hot_shard_on_a_device_serves_and_updates_rows_as_in_dram(device):
    """A hot shard with its rows in a torch arena on `device` (on a GPU: issue 5's hot shard on
    CUDA) takes rows moved in from a cold shard, serves fetches, applies 10 steps of pushes with
    duplicates and hands the rows back, bit-identical to a hot shard keeping them in numpy."""
    from memory_service.storage.tiers.device import DeviceTier

    cfg = table(num_rows=1000, width=64, optimizer=ADAM)
    cold, dram, hot = Shard(0, 1), Shard(0, 1, role="hot"), Shard(0, 1, role="hot", device=device)
    for shard in (cold, dram, hot):
        shard.create_table(cfg)
    rng = np.random.default_rng(3)
    cold.push("c", {"x": TablePush(1, rng.integers(0, 1000, 300), grads(300))})  # rows with state
    moving = np.unique(rng.integers(0, 1000, 400))  # some written on the cold shard, some never
    records = cold.export_rows("x", moving, version=1)
    for shard in (dram, hot):
        shard.import_rows("x", records, version=1, ids=moving)
    arena = hot._tables["x"].arena  # the store's fast tier (white-box: where the rows live)
    assert isinstance(arena, DeviceTier) and arena.rows_tensor(np.arange(1)).device.type == device
    for step in range(2, 12):
        ids = rng.choice(moving, 256)  # repeats
        g = rng.standard_normal((256, 64)).astype(np.float32)
        for shard in (dram, hot):
            shard.push("c", {"x": TablePush(step, ids, g)})
        want, got = dram.fetch({"x": ids[::-1]})["x"], hot.fetch({"x": ids[::-1]})["x"]
        assert got.dtype == np.float32 and got.shape == (256, 64)
        np.testing.assert_array_equal(got, want)
    assert hot.digest() == dram.digest()
    back, want = hot.export_rows("x", moving, version=2), dram.export_rows("x", moving, version=2)
    for field in ("ids", "rows", "state", "last"):
        np.testing.assert_array_equal(getattr(back, field), getattr(want, field))


def test_a_device_is_for_all_dram_shards(tmp_path):
    from memory_service.config import StorageConfig

    with pytest.raises(InvalidArgument, match="device 'cpu' is for all-DRAM shards"):
        Shard(0, 1, storage=StorageConfig(path=str(tmp_path)), device="cpu")
