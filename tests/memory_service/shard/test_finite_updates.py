"""Rows and optimizer state stay finite: a push whose finite gradients would make a row or its
optimizer state non-finite (duplicates summed past float32's range, a huge learning rate, a
gradient whose square overflows Adam's second moment) is refused with INVALID_ARGUMENT naming the
table and a row, and nothing of the request is applied or logged, over real gRPC to a cold shard
with real LMDB files and a write-ahead log."""
import os

import grpc
import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.wire import codec

WIDTH = 4
KINDS = ("sgd", "adagrad", "sparse_adam", "adam")
TABLES = {kind: TableConfig(kind, 1000, WIDTH, seed=3, optimizer=OptimizerConfig(kind, lr=0.01)) for kind in KINDS}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the cold shard, a stub of its gRPC server, its write-ahead log's directory)."""
    path = str(tmp_path_factory.mktemp("finite"))
    shard = Shard(0, 1, StorageConfig(path=path))
    for cfg in TABLES.values():
        shard.create_table(cfg)
        shard.push("setup", {cfg.name: TablePush(1, np.arange(8), np.ones((8, WIDTH), np.float32))})
    server = serve(shard)
    channel = grpc.insecure_channel(server.address)
    yield shard, memory_pb2_grpc.MemoryServiceStub(channel), os.path.join(path, "wal")
    channel.close()
    server.stop(grace=None)
    shard.close()


def wal_bytes(wal_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(wal_dir, f)) for f in os.listdir(wal_dir))


def grads_of(name: str, step: int, ids, grads, lr: float | None = None) -> memory_pb2.TableGrads:
    ids, grads = np.asarray(ids, np.int64), np.asarray(grads, np.float32).reshape(len(ids), WIDTH)
    return memory_pb2.TableGrads(table=name, step=step, width=WIDTH, dtype=codec.dtype_to_proto("float32"), ids=codec.encode_ids(ids),
                                 grads=codec.encode_rows(grads, "float32"), **codec.lr_field(lr))


def refused(served, *tables: memory_pb2.TableGrads, client_id: str = "t", **fields) -> str:
    """Sends one Push of `tables`; asserts INVALID_ARGUMENT and that neither the shard's state nor
    its write-ahead log changed; returns the error's details."""
    shard, stub, wal = served
    digest, logged = shard.digest(), wal_bytes(wal)
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(memory_pb2.PushRequest(client_id=client_id, tables=list(tables), **fields), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert shard.digest() == digest, "a refused push changed the shard"
    assert wal_bytes(wal) == logged, "a refused push was logged"
    return err.value.details()


def step_of(shard: Shard, name: str) -> int:
    return shard.describe_table(name).step + 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_repeated_id_whose_sum_overflows_is_refused(served, kind):
    """3e38 twice on one id: each gradient is finite, their sum is not."""
    shard = served[0]
    details = refused(served, grads_of(kind, step_of(shard, kind), [5, 5, 6], np.full((3, WIDTH), 3e38)))
    assert repr(kind) in details and "5" in details, details


def test_a_learning_rate_that_overflows_the_rows_is_refused(served):
    """lr 1e30 times a gradient of 1e10: an SGD row of -1e40, past float32's range."""
    shard = served[0]
    details = refused(served, grads_of("sgd", step_of(shard, "sgd"), [2], np.full((1, WIDTH), 1e10), lr=1e30))
    assert "'sgd'" in details and "2" in details, details


@pytest.mark.parametrize("kind,gradient", [("adagrad", 1e20), ("sparse_adam", 1e20), ("adam", 1e22)])
def test_a_gradient_whose_square_overflows_the_second_moment_is_refused(served, kind, gradient):
    """1e20: its square, 1e40, overflows SparseAdam's second moment (Adagrad's sum) to inf; dense
    Adam scales the square by 1 - beta2 first (torch's addcmul order), so it takes 1e22."""
    shard = served[0]
    details = refused(served, grads_of(kind, step_of(shard, kind), [3], np.full((1, WIDTH), gradient)))
    assert repr(kind) in details and "3" in details, details


def test_nothing_of_a_request_is_applied_when_one_table_is_refused(served):
    """The healthy table's push of the same request is not applied either (all tables or none),
    whichever order the tables come in."""
    shard = served[0]
    healthy = grads_of("sgd", step_of(shard, "sgd"), [1, 2], np.ones((2, WIDTH)))
    bad = grads_of("adam", step_of(shard, "adam"), [3], np.full((1, WIDTH), 1e22))
    refused(served, healthy, bad)
    refused(served, bad, healthy)


def test_data_parallel_parts_whose_sum_overflows_are_refused(served):
    """Two workers' parts of one step, 3e38 each on one row: the second part, which would apply
    their sum, is refused; the step then completes with a finite second part."""
    shard, stub, _ = served
    step = step_of(shard, "sparse_adam")
    part = grads_of("sparse_adam", step, [4], np.full((1, WIDTH), 3e38))
    stub.Push(memory_pb2.PushRequest(client_id="w0", tables=[part], contributors=2), timeout=30)
    details = refused(served, part, client_id="w1", contributors=2)
    assert "'sparse_adam'" in details, details
    fine = grads_of("sparse_adam", step, [4], np.full((1, WIDTH), -3e38))
    assert stub.Push(memory_pb2.PushRequest(client_id="w1", tables=[fine], contributors=2), timeout=30).rows_updated == 1
    assert np.isfinite(shard.fetch({"sparse_adam": np.array([4])})["sparse_adam"]).all()


def test_a_commit_whose_parts_sum_overflows_is_refused(served):
    """Parts sent with commit_later are summed at the K-th CommitStep: that commit is refused
    when the sum is not finite, and nothing changes."""
    shard, stub, wal = served
    step = step_of(shard, "adam")
    for client in ("c0", "c1"):
        stub.Push(memory_pb2.PushRequest(client_id=client, contributors=2, commit_later=True, tables=[
            grads_of("adam", step, [7], np.full((1, WIDTH), 3e38))]), timeout=30)
    commit = memory_pb2.CommitStepRequest(contributors=2, tables=[memory_pb2.TableStep(table="adam", step=step)])
    stub.CommitStep(memory_pb2.CommitStepRequest(client_id="c0", contributors=2, tables=commit.tables), timeout=30)
    digest, logged = shard.digest(), wal_bytes(wal)
    with pytest.raises(grpc.RpcError) as err:
        stub.CommitStep(memory_pb2.CommitStepRequest(client_id="c1", contributors=2, tables=commit.tables), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "'adam'" in err.value.details() and "7" in err.value.details()
    assert shard.digest() == digest and wal_bytes(wal) == logged


def test_every_row_stays_finite_after_the_refusals(served):
    shard = served[0]
    for kind in KINDS:
        state = shard.table_state(kind)
        assert np.isfinite(state["rows"]).all() and np.isfinite(state["state"]).all(), kind


@pytest.mark.parametrize("how", ["empty push", "commit"])
def test_a_dense_adam_rate_that_would_overflow_a_catch_up_is_refused(served, how):
    """An adam table moves rows on read over the steps they skipped (catch-up), so a step's rate
    that no push row overflowed can still carry a later read's rows past float32's range: a step
    logged with lr 1e38 (an empty push, or a commit) is refused, and rows stay finite on read."""
    shard, stub, wal = served
    step = step_of(shard, "adam")
    digest, logged = shard.digest(), wal_bytes(wal)
    with pytest.raises(grpc.RpcError) as err:
        if how == "empty push":
            stub.Push(memory_pb2.PushRequest(client_id="t", tables=[grads_of("adam", step, [], [], lr=1e38)]), timeout=30)
        else:
            stub.CommitStep(memory_pb2.CommitStepRequest(client_id="t", tables=[
                memory_pb2.TableStep(table="adam", step=step, lr=1e38)]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "'adam'" in err.value.details()
    assert shard.digest() == digest and wal_bytes(wal) == logged
    stub.Push(memory_pb2.PushRequest(client_id="t", tables=[grads_of("adam", step, [], [])]), timeout=30)
    assert np.isfinite(shard.fetch({"adam": np.arange(8)}, min_step=step)["adam"]).all()
