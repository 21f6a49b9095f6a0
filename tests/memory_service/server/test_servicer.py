"""MemoryServicer end to end: a real Shard behind a real gRPC server on 127.0.0.1, called through a
real channel. Every rejected request is checked for its status code, its message, and that the
shard's state digest did not move."""
from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.wire import codec
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server.servicer import SERVICE_NAME, serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

# Shard 0 of 2 holds the even row ids: the odd ones exercise the "another shard's id" check.
EMB = TableConfig(name="emb", num_rows=1000, width=8, seed=1,
                  optimizer=OptimizerConfig(kind="sparse_adam", lr=0.01))
EMB16 = TableConfig(name="emb16", num_rows=500, width=4, dtype="bfloat16", seed=2,
                    optimizer=OptimizerConfig(kind="adagrad", lr=0.1, eps=1e-10))
Code = grpc.StatusCode


def _grads(cfg: TableConfig, ids: np.ndarray, step: int, seed: int = 0) -> memory_pb2.TableGrads:
    grads = np.random.default_rng(seed).standard_normal((len(ids), cfg.width)).astype(np.float32)
    return memory_pb2.TableGrads(table=cfg.name, step=step, dtype=codec.dtype_to_proto(cfg.dtype),
                                 width=cfg.width, ids=codec.encode_ids(ids),
                                 grads=codec.encode_rows(grads, cfg.dtype))


def _push(*tables: memory_pb2.TableGrads, client_id: str = "trainer-0") -> memory_pb2.PushRequest:
    return memory_pb2.PushRequest(client_id=client_id, tables=tables)


def _fetch(**ids_of_table: list[int]) -> memory_pb2.FetchRequest:
    return memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table=t, ids=codec.encode_ids(np.array(ids)))
                                           for t, ids in ids_of_table.items()])


def _primed_shard() -> Shard:
    """Shard 0 of 2 holding both tables, with rows and optimizer state already written."""
    shard = Shard(shard_id=0, num_shards=2)
    for cfg in (EMB, EMB16):
        shard.create_table(cfg)
    rng = np.random.default_rng(0)
    shard.push("setup", {
        "emb": TablePush(1, np.array([0, 2, 4]), rng.standard_normal((3, 8)).astype(np.float32)),
        "emb16": TablePush(1, np.array([10]), rng.standard_normal((1, 4)).astype(np.float32))})
    return shard


@pytest.fixture
def shard() -> Shard:
    return _primed_shard()


@pytest.fixture
def server(shard):
    server = serve(shard)
    yield server
    server.stop(grace=None)


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address, options=codec.MESSAGE_OPTIONS) as channel:
        yield channel


@pytest.fixture
def stub(channel) -> memory_pb2_grpc.MemoryServiceStub:
    return memory_pb2_grpc.MemoryServiceStub(channel)


def test_serve_binds_a_free_port_on_loopback(server):
    assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"


def test_serve_refuses_a_port_in_use(server, shard):
    # grpc.so_reuseport=0: without it a second server would silently share the port
    with pytest.raises(RuntimeError, match="Failed to bind"):
        serve(shard, port=server.port)


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_health_is_serving(channel, service):
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_create_describe_list_drop(stub):
    cfg = TableConfig(name="new", num_rows=10**8, width=16, dtype="bfloat16", init_scale=0.02,
                      seed=7, optimizer=OptimizerConfig(kind="sgd", lr=0.5))
    created = stub.CreateTable(memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(cfg)))
    assert codec.table_info_from_proto(created).config == cfg
    assert (created.step, created.rows_materialized) == (0, 0)
    again = stub.CreateTable(memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(cfg)))
    assert again == created  # re-creating with the same config is a no-op
    assert stub.DescribeTable(memory_pb2.DescribeTableRequest(name="new")) == created
    assert list(stub.ListTables(memory_pb2.ListTablesRequest()).names) == ["emb", "emb16", "new"]
    stub.DropTable(memory_pb2.DropTableRequest(name="new"))
    assert list(stub.ListTables(memory_pb2.ListTablesRequest()).names) == ["emb", "emb16"]


def test_describe_reports_step_and_memory(stub, shard):
    info = stub.DescribeTable(memory_pb2.DescribeTableRequest(name="emb"))
    assert codec.table_info_from_proto(info) == shard.describe_table("emb")
    assert (info.step, info.rows_materialized) == (1, 3) and info.nbytes > 0


def test_fetch_several_tables_in_request_order(stub, shard):
    ids16, ids = [0, 10, 498, 10], [4, 0, 998, 4, 100]  # repeats and untouched rows
    response = stub.Fetch(_fetch(emb16=ids16, emb=ids))
    assert [t.table for t in response.tables] == ["emb16", "emb"]
    expected = shard.fetch({"emb16": np.array(ids16), "emb": np.array(ids)})
    for msg, cfg, n in zip(response.tables, (EMB16, EMB), (len(ids16), len(ids))):
        assert (msg.dtype, msg.width) == (codec.dtype_to_proto(cfg.dtype), cfg.width)
        rows = codec.decode_rows(msg.rows, n, cfg.width, cfg.dtype, cfg.name)  # (n, width)
        reference = codec.decode_rows(codec.encode_rows(expected[cfg.name], cfg.dtype), n, cfg.width,
                                     cfg.dtype, cfg.name)  # what the dtype keeps of the fp32 rows
        np.testing.assert_array_equal(rows, reference)
    np.testing.assert_array_equal(rows[0], rows[3])


def test_push_updates_rows_like_the_shard_in_process(stub, shard):
    emb_ids, emb16_ids = np.array([0, 2, 2, 6]), np.array([8])  # a repeated id is summed
    request = _push(_grads(EMB, emb_ids, step=2, seed=1), _grads(EMB16, emb16_ids, step=2, seed=2))
    digest = shard.digest()
    assert stub.Push(request).rows_updated == 4  # 3 distinct rows of emb + 1 of emb16
    assert shard.digest() != digest
    # the same gradients (as the wire dtype keeps them) pushed in-process to a twin shard
    twin = _primed_shard()
    twin.push("twin", {cfg.name: TablePush(2, ids, codec.decode_rows(msg.grads, len(ids), cfg.width,
                                                                    cfg.dtype, cfg.name))
                       for msg, cfg, ids in zip(request.tables, (EMB, EMB16), (emb_ids, emb16_ids))})
    assert shard.digest() == twin.digest()
    for cfg in (EMB, EMB16):
        ids = np.arange(0, 12, 2)
        np.testing.assert_array_equal(shard.fetch({cfg.name: ids})[cfg.name],
                                      twin.fetch({cfg.name: ids})[cfg.name])


def test_stats(stub, shard):
    stub.Fetch(_fetch(emb=[0, 2, 2], emb16=[4]))
    stub.Push(_push(_grads(EMB, np.array([8, 8]), step=2)))
    stats = stub.Stats(memory_pb2.StatsRequest())
    assert (stats.shard_id, stats.num_shards) == (0, 2)
    # the fixture's in-process push counts too: 1 + 1 pushes of 4 + 2 rows
    assert (stats.counters.fetch_requests, stats.counters.fetch_rows) == (1, 4)
    assert (stats.counters.push_requests, stats.counters.push_rows) == (2, 6)
    assert [t.name for t in stats.tables] == ["emb", "emb16"]
    emb = stats.tables[0]
    assert (emb.num_rows, emb.width, emb.step, emb.rows_materialized) == (1000, 8, 2, 4)
    assert emb.nbytes == shard.describe_table("emb").nbytes


def test_fetch_64k_rows_above_grpcs_default_limit(stub, shard, server):
    cfg = TableConfig(name="big", num_rows=2**20, width=64)
    shard.create_table(cfg)
    ids = np.arange(0, 2 * 65536, 2)  # (65536,) even ids: shard 0's
    response = stub.Fetch(_fetch(big=ids))
    assert response.ByteSize() > 16 * 2**20 > 4 * 2**20  # gRPC's default receive limit is 4 MiB
    rows = codec.decode_rows(response.tables[0].rows, len(ids), 64, "float32", "big")  # (65536, 64)
    sample = slice(None, None, 1021)  # computing all 64k rows twice would double the test's time
    np.testing.assert_array_equal(rows[sample], shard.fetch({"big": ids[sample]})["big"])
    # a channel left at gRPC's defaults cannot take it: the limit is what makes this work
    with grpc.insecure_channel(server.address) as default_channel:
        with pytest.raises(grpc.RpcError) as err:
            memory_pb2_grpc.MemoryServiceStub(default_channel).Fetch(_fetch(big=ids))
    assert err.value.code() == Code.RESOURCE_EXHAUSTED


# --- rejected requests: status, message, and no state change --------------------------------------

def _bad_ids_payload(table: str) -> memory_pb2.TableIds:
    return memory_pb2.TableIds(table=table, ids=b"\0" * 12)


def _with(msg: memory_pb2.TableGrads, **changes) -> memory_pb2.TableGrads:
    msg = memory_pb2.TableGrads.FromString(msg.SerializeToString())
    for field, value in changes.items():
        setattr(msg, field, value)
    return msg


GOOD = _grads(EMB, np.array([0, 6]), step=2)
GOOD16 = _grads(EMB16, np.array([2]), step=2)
BAD_GRAD = np.full((1, 8), np.nan, np.float32)
TWO_ROWS_IDS = codec.encode_ids(np.array([0, 2]))

REJECTED = {
    # rpc, request, code, message (regex)
    "describe unknown table": ("DescribeTable", memory_pb2.DescribeTableRequest(name="nope"),
                               Code.NOT_FOUND, r"table 'nope' not found on shard 0"),
    "drop unknown table": ("DropTable", memory_pb2.DropTableRequest(name="nope"),
                           Code.NOT_FOUND, r"table 'nope' not found"),
    "fetch unknown table": ("Fetch", _fetch(emb=[0], nope=[0]), Code.NOT_FOUND, r"table 'nope' not found"),
    "push unknown table": ("Push", _push(GOOD, _with(GOOD, table="nope")), Code.NOT_FOUND,
                           r"table 'nope' not found"),
    "fetch id out of range": ("Fetch", _fetch(emb16=[0], emb=[0, 1000]), Code.INVALID_ARGUMENT,
                              r"table 'emb': row id 1000 out of range \[0, 1000\)"),
    "fetch negative id": ("Fetch", _fetch(emb=[-2]), Code.INVALID_ARGUMENT,
                          r"table 'emb': row id -2 out of range \[0, 1000\)"),
    "fetch id of another shard": ("Fetch", _fetch(emb=[3]), Code.INVALID_ARGUMENT,
                                  r"table 'emb': row id 3 belongs to shard 1 of 2, not to shard 0"),
    "push id out of range (second table)": (
        "Push", _push(GOOD, _with(GOOD16, ids=codec.encode_ids(np.array([500])))), Code.INVALID_ARGUMENT,
        r"table 'emb16': row id 500 out of range \[0, 500\)"),
    "push negative id": ("Push", _push(_with(GOOD, ids=codec.encode_ids(np.array([0, -4])))),
                         Code.INVALID_ARGUMENT, r"table 'emb': row id -4 out of range \[0, 1000\)"),
    "push width mismatch": ("Push", _push(GOOD16, _with(GOOD, width=4)), Code.INVALID_ARGUMENT,
                            r"table 'emb': grads width 4 does not match the table's width 8"),
    "push dtype mismatch": ("Push", _push(GOOD, _with(GOOD16, dtype=memory_pb2.DTYPE_FLOAT32)),
                            Code.INVALID_ARGUMENT,
                            r"table 'emb16': grads dtype float32 does not match the table's dtype bfloat16"),
    "push dtype unspecified": ("Push", _push(_with(GOOD, dtype=memory_pb2.DTYPE_UNSPECIFIED)),
                               Code.INVALID_ARGUMENT, r"table 'emb': dtype DTYPE_UNSPECIFIED must be one of"),
    "fetch truncated ids": ("Fetch", memory_pb2.FetchRequest(tables=[_bad_ids_payload("emb")]),
                            Code.INVALID_ARGUMENT,
                            r"table 'emb': ids payload of 12 bytes is not a multiple of 8"),
    "push truncated ids": ("Push", _push(_with(GOOD, ids=b"\0" * 12)), Code.INVALID_ARGUMENT,
                           r"table 'emb': ids payload of 12 bytes is not a multiple of 8"),
    "push truncated grads": ("Push", _push(GOOD16, _with(GOOD, grads=GOOD.grads[:-1])),
                             Code.INVALID_ARGUMENT,
                             r"table 'emb': rows payload of 63 bytes, expected 64 \(2 rows x width 8"),
    "push grads for fewer rows than ids": (
        "Push", _push(_with(GOOD, ids=codec.encode_ids(np.array([0, 2, 4])))), Code.INVALID_ARGUMENT,
        r"table 'emb': rows payload of 64 bytes, expected 96 \(3 rows x width 8"),
    "push non-finite gradient": (
        "Push", _push(_with(GOOD, ids=codec.encode_ids(np.array([4])), grads=BAD_GRAD.tobytes())),
        Code.INVALID_ARGUMENT, r"table 'emb': gradient of row id 4 is not finite"),
    "push step 0": ("Push", _push(_with(GOOD, step=0)), Code.INVALID_ARGUMENT,
                    r"table 'emb': step 0 must be an integer >= 1"),
    "push empty client id": ("Push", _push(GOOD, client_id=""), Code.INVALID_ARGUMENT,
                             r"push: client_id must be non-empty"),
    "push table twice": ("Push", _push(GOOD, GOOD16, GOOD), Code.INVALID_ARGUMENT,
                         r"push: table 'emb' appears more than once in one request"),
    "fetch table twice": ("Fetch", memory_pb2.FetchRequest(tables=[
        memory_pb2.TableIds(table="emb", ids=TWO_ROWS_IDS)] * 2), Code.INVALID_ARGUMENT,
        r"fetch: table 'emb' appears more than once in one request"),
    "create with a different config": (
        "CreateTable", memory_pb2.CreateTableRequest(
            config=codec.table_config_to_proto(TableConfig(name="emb", num_rows=1000, width=16, seed=1))),
        Code.ALREADY_EXISTS, r"table 'emb' exists with a different config: width 8 != 16"),
    "create with an invalid config": (
        "CreateTable", memory_pb2.CreateTableRequest(config=memory_pb2.TableConfig(name="x")),
        Code.INVALID_ARGUMENT, r"table 'x': the optimizer config is required"),
    # found by tests/memory_service/server/test_fuzz.py, or closed before it ran
    "push a step far beyond the table's": (
        "Push", _push(_with(GOOD, step=2**64 - 1)), Code.INVALID_ARGUMENT,
        r"table 'emb': step 18446744073709551615 is more than 1048576 steps beyond the table's step 1"),
    "commit step 0": ("CommitStep", memory_pb2.CommitStepRequest(client_id="c", tables=[
        memory_pb2.TableStep(table="emb", step=0)]), Code.INVALID_ARGUMENT, r"table 'emb': commit step 0 must be"),
    "create with an infinite lr over an existing table": (
        "CreateTable", memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(EMB)),
        Code.INVALID_ARGUMENT, r"optimizer lr inf must be > 0 and finite"),
    "import repeated ids": ("ImportRows", memory_pb2.ImportRowsRequest(
        records=memory_pb2.RowRecords(table="emb", ids=codec.encode_ids(np.array([2, 2])), rows=bytes(64),
                                      state=bytes(128), last=bytes(16)), ids=codec.encode_ids(np.array([2, 2]))),
        Code.INVALID_ARGUMENT, r"table 'emb': imported ids must be distinct"),
    "import non-finite rows": ("ImportRows", memory_pb2.ImportRowsRequest(
        records=memory_pb2.RowRecords(table="emb", ids=codec.encode_ids(np.array([2])), rows=BAD_GRAD.tobytes(),
                                      state=bytes(64), last=bytes(8)), ids=codec.encode_ids(np.array([2]))),
        Code.INVALID_ARGUMENT, r"table 'emb': imported rows and optimizer state must be finite"),
    "describe a name longer than a status may quote": (
        "DescribeTable", memory_pb2.DescribeTableRequest(name="x" * 100_000), Code.NOT_FOUND,
        r"^table 'xxx+\.\.\. \(truncated\)$"),  # not RESOURCE_EXHAUSTED from an 8 KiB trailer limit
    "bytes that are no message": ("Fetch", b"\x0a\xff\xff\xff\x0f", Code.INVALID_ARGUMENT,
                                  r"Fetch: the request is not a valid message: DecodeError"),
    # the shared-memory reply path (server/fetch_replies.py)
    "fetch into a reply file not on this host": (
        "Fetch", memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="emb", ids=TWO_ROWS_IDS)],
                                         shared_memory=memory_pb2.SharedMemoryReply(
                                             path="/dev/shm/engram-reply-absent-from-this-host")),
        Code.FAILED_PRECONDITION, r"shared-memory reply file '/dev/shm/engram-reply-absent-from-this-host' "
                                  r"cannot be opened on this shard's host"),
    "fetch into a file outside the reply folder": (
        "Fetch", memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="emb", ids=TWO_ROWS_IDS)],
                                         shared_memory=memory_pb2.SharedMemoryReply(path="/etc/passwd")),
        Code.INVALID_ARGUMENT, r"shared-memory reply path '/etc/passwd' must be /dev/shm/engram-reply-\*"),
}
REJECTED["create with an infinite lr over an existing table"][1].config.optimizer.lr = float("inf")


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_request_changes_nothing(stub, channel, shard, case):
    rpc, request, code, message = REJECTED[case]
    digest, tables = shard.digest(), shard.list_tables()
    with pytest.raises(grpc.RpcError) as err:
        if isinstance(request, bytes):  # sent as they are, not as a message
            channel.unary_unary(f"/{SERVICE_NAME}/{rpc}")(request)
        else:
            getattr(stub, rpc)(request)
    assert err.value.code() == code, err.value.details()
    assert err.value.details() is not None
    assert re.search(message, err.value.details()), err.value.details()
    assert shard.digest() == digest and shard.list_tables() == tables


def test_the_valid_push_of_the_rejected_cases_does_change_state(stub, shard):
    digest = shard.digest()
    assert stub.Push(_push(GOOD, GOOD16)).rows_updated == 3
    assert shard.digest() != digest


def test_a_push_says_whether_it_carries_an_lr(stub):
    """TableGrads.lr and TableStep.lr have explicit presence: absent is the table's configured lr,
    0.0 a zero step (rows stay; the step and its lr are logged), through the stub and through
    MemoryClient (which RemoteTables pushes with)."""
    ids = np.array([0, 2, 4])
    def rows() -> bytes:
        return stub.Fetch(_fetch(emb=ids.tolist())).tables[0].rows

    first = rows()
    assert stub.Push(_push(_grads(EMB, ids, step=2))).rows_updated == 3  # no lr: EMB's 0.01
    assert rows() != first
    twin = _primed_shard()
    twin.push("twin", {"emb": TablePush(2, ids, codec.decode_rows(_grads(EMB, ids, 2).grads, 3, 8, "float32", "emb"),
                                        lr=EMB.optimizer.lr)})
    assert rows() == codec.encode_rows(twin.fetch({"emb": ids})["emb"], "float32")
    after_two = rows()
    zero = _grads(EMB, ids, step=3)
    zero.lr = 0.0
    assert zero.HasField("lr")
    assert stub.Push(_push(zero)).rows_updated == 3
    assert rows() == after_two  # a zero step
    # a commit without an lr means the configured one, which step 3 was not pushed with
    with pytest.raises(grpc.RpcError) as err:
        stub.CommitStep(memory_pb2.CommitStepRequest(client_id="c", tables=[memory_pb2.TableStep(table="emb", step=3)]))
    assert err.value.code() == Code.INVALID_ARGUMENT and "not 0.01" in err.value.details()
    stub.CommitStep(memory_pb2.CommitStepRequest(client_id="c", tables=[memory_pb2.TableStep(table="emb", step=3, lr=0.0)]))


def test_memory_client_sends_lr_zero_as_a_zero_step():
    from memory_service.client import MemoryClient  # only here: the other tests call the stub
    cfg = TableConfig(name="solo", num_rows=1000, width=4, seed=5, optimizer=OptimizerConfig("sgd", lr=0.5))
    ids, grads = np.array([0, 3, 4]), np.ones((3, 4), np.float32)
    shard = Shard(shard_id=0, num_shards=1)
    server = serve(shard)
    try:
        with MemoryClient([server.address], shared_memory=False) as client:
            client.create_table(cfg)
            start = shard.fetch({"solo": ids})["solo"]
            client.push({"solo": (ids, grads)}, step=1, lr=0.0)
            np.testing.assert_array_equal(shard.fetch({"solo": ids})["solo"], start)
            assert shard.describe_table("solo").step == 1  # the step happened
            client.push({"solo": (ids, grads)}, step=2)  # no lr: the configured 0.5
            np.testing.assert_array_equal(shard.fetch({"solo": ids})["solo"], start - np.float32(0.5))
    finally:
        server.stop(grace=None)
