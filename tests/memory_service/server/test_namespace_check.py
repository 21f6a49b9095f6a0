"""Tokens scoped to namespaces, on one real shard served over gRPC on 127.0.0.1: a token of
namespace "a" is refused (PERMISSION_DENIED) on every rpc of the MemoryService naming namespace
"b"'s tables, or spanning namespaces, and the shard's state digest does not move; a read-scoped
token of "a" is refused "a"'s write rpcs; ListTables and Stats show "a"'s tables only. The rpcs
are enumerated from the service descriptor: an rpc added to the proto fails
test_every_rpc_is_covered until REQUESTS says how a token of "a" calls it against "b"."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from memory_service.config import OptimizerConfig, TableConfig, namespace_of
from memory_service.rpc import memory_pb2
from memory_service.server.servicer import SERVICE_NAME, serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.wire import codec
from memory_service.wire.security import (
    Caller,
    SecurityConfig,
    TokenCheck,
    token_digest,
)

ADMIN, A_WRITE, A_READ, AB_MIXED = "admin-0001", "a-writer-0002", "a-reader-0003", "mixed-0004"
OPT = OptimizerConfig(kind="sparse_adam", lr=0.01)
TABLES = [TableConfig(name=n, num_rows=64, width=4, seed=3, optimizer=OPT) for n in ("a/t", "a/u", "b/t", "plain")]
SERVICE = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"]


def _ids(*ids: int) -> bytes:
    return codec.encode_ids(np.array(ids, np.int64))


def _grads(table: str, step: int = 2) -> memory_pb2.TableGrads:
    return memory_pb2.TableGrads(table=table, step=step, dtype=memory_pb2.DTYPE_FLOAT32, width=4, ids=_ids(0, 1),
                                 grads=codec.encode_rows(np.ones((2, 4), np.float32), "float32"))


def _records(table: str) -> memory_pb2.RowRecords:
    return memory_pb2.RowRecords(table=table, ids=_ids(5), rows=np.zeros(4, np.float32).tobytes(),
                                 state=np.zeros(8, np.float32).tobytes(), last=_ids(1))


# rpc -> a request a token of namespace "a" sends naming namespace "b"'s table b/t (or spanning
# namespaces); None: the rpc names no table and answers with the caller's tables only
REQUESTS = {
    "CreateTable": memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(
        TableConfig(name="b/new", num_rows=8, width=4, seed=1, optimizer=OPT))),
    "DescribeTable": memory_pb2.DescribeTableRequest(name="b/t"),
    "DropTable": memory_pb2.DropTableRequest(name="b/t"),
    "ListTables": None,
    "Fetch": memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="a/t", ids=_ids(0)),
                                             memory_pb2.TableIds(table="b/t", ids=_ids(0))]),
    "Push": memory_pb2.PushRequest(client_id="a", tables=[_grads("b/t")]),
    "CommitStep": memory_pb2.CommitStepRequest(client_id="a", tables=[memory_pb2.TableStep(table="b/t", step=2)]),
    "Stats": None,
    "ExportRows": memory_pb2.ExportRowsRequest(table="a/t", ids=_ids(0), version=1),  # spans: migration
    "ImportRows": memory_pb2.ImportRowsRequest(records=_records("a/t"), version=1, ids=_ids(5)),
    "ReturnRows": memory_pb2.ReturnRowsRequest(table="a/t", ids=_ids(0), version=1, client_id="m", request_seq=1),
    "HotMap": memory_pb2.HotMapRequest(table="b/t"),
    "DrainAccesses": memory_pb2.DrainAccessesRequest(),
    "Announce": memory_pb2.AnnounceRequest(tables=[memory_pb2.TableIds(table="a/t", ids=_ids(1))],
                                           direct_reads=[memory_pb2.TableIds(table="b/t", ids=_ids(1))]),
    "DirectReads": memory_pb2.DirectReadsRequest(),
    "CheckpointPause": memory_pb2.CheckpointPauseRequest(pause=True, lease_seconds=1, timeout_seconds=1),
    "CheckpointSave": memory_pb2.CheckpointSaveRequest(path="/tmp", step=1, tables=["a/t", "b/t"]),
    "CheckpointRestore": memory_pb2.CheckpointRestoreRequest(path="/tmp/nothing"),
    "FreezeTable": memory_pb2.FreezeTableRequest(table="b/t"),
    "WriteRecords": memory_pb2.WriteRecordsRequest(records=_records("b/t")),
    "ReadRecords": memory_pb2.ReadRecordsRequest(table="b/t", ids=_ids(0)),
}


@pytest.fixture(scope="module")
def served():
    shard = Shard(0, 1)
    for cfg in TABLES:
        shard.create_table(cfg)
        shard.push("setup", {cfg.name: TablePush(1, np.arange(4), np.ones((4, 4), np.float32))})
    security = SecurityConfig.from_tokens(write_tokens=[ADMIN], namespace_tokens={
        "a": {"write": [A_WRITE, AB_MIXED], "read": [A_READ]}, "b": {"read": [AB_MIXED]}})
    server = serve(shard, security=security)
    channel = grpc.insecure_channel(server.address, options=codec.MESSAGE_OPTIONS)
    yield shard, channel
    channel.close()
    server.stop(None)


def _call(channel: grpc.Channel, rpc: str, request, token: str):
    method = SERVICE.methods_by_name[rpc]
    call = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=memory_pb2.__dict__[method.output_type.name].FromString)
    return call(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)


def _code(channel, rpc, request, token) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, rpc, request, token)
    return err.value.code(), err.value.details()


def test_every_rpc_is_covered():
    assert set(REQUESTS) == set(SERVICE.methods_by_name), "say how a namespace-a token calls the new rpc on b"


@pytest.mark.parametrize("token", [A_WRITE, AB_MIXED], ids=["a-writer", "a-writer-b-reader"])
def test_a_token_of_a_is_refused_every_rpc_on_b(served, token):
    shard, channel = served
    before = shard.digest()
    for rpc, request in REQUESTS.items():
        if request is None:
            continue
        if token == AB_MIXED and rpc in ("DescribeTable", "HotMap", "Fetch", "Announce", "ReadRecords"):
            continue  # it may read b (below)
        code, details = _code(channel, rpc, request, token)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
        assert "namespace" in details, details
    assert shard.digest() == before
    assert shard.list_tables() == sorted(cfg.name for cfg in TABLES)


def test_a_read_token_of_a_is_refused_a_s_write_rpcs(served):
    shard, channel = served
    before = shard.digest()
    assert _call(channel, "Fetch", memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="a/t", ids=_ids(0))]),
                 A_READ).tables[0].width == 4
    assert _call(channel, "DescribeTable", memory_pb2.DescribeTableRequest(name="a/u"), A_READ).config.name == "a/u"
    writes = {"Push": memory_pb2.PushRequest(client_id="r", tables=[_grads("a/t")]),
              "CommitStep": memory_pb2.CommitStepRequest(client_id="r", tables=[memory_pb2.TableStep(table="a/t", step=2)]),
              "DropTable": memory_pb2.DropTableRequest(name="a/u"),
              "CreateTable": memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(
                  TableConfig(name="a/new", num_rows=8, width=4, seed=1, optimizer=OPT)))}
    for rpc, request in writes.items():
        assert _code(channel, rpc, request, A_READ)[0] == grpc.StatusCode.PERMISSION_DENIED, rpc
    assert shard.digest() == before


def test_a_reader_of_b_reads_b_and_writes_a_only(served):
    _, channel = served
    fetched = _call(channel, "Fetch", REQUESTS["Fetch"], AB_MIXED)
    assert [t.table for t in fetched.tables] == ["a/t", "b/t"]
    assert _code(channel, "Push", memory_pb2.PushRequest(client_id="m", tables=[_grads("a/t"), _grads("b/t")]),
                 AB_MIXED)[0] == grpc.StatusCode.PERMISSION_DENIED


def test_listings_show_the_token_s_namespaces_only(served):
    _, channel = served
    assert list(_call(channel, "ListTables", memory_pb2.ListTablesRequest(), A_WRITE).names) == ["a/t", "a/u"]
    assert list(_call(channel, "ListTables", memory_pb2.ListTablesRequest(), AB_MIXED).names) == ["a/t", "a/u", "b/t"]
    assert len(_call(channel, "ListTables", memory_pb2.ListTablesRequest(), ADMIN).names) == len(TABLES)
    stats = _call(channel, "Stats", memory_pb2.StatsRequest(), A_READ)
    assert [t.name for t in stats.tables] == ["a/t", "a/u"]
    assert not stats.HasField("counters")  # shard-wide sums over every namespace
    assert _call(channel, "Stats", memory_pb2.StatsRequest(), ADMIN).counters.push_requests >= len(TABLES)


def test_a_writer_of_a_writes_a(served):
    shard, channel = served
    before = shard.digest()
    assert _call(channel, "Push", memory_pb2.PushRequest(client_id="w", tables=[_grads("a/u")]),
                 A_WRITE).rows_updated == 2
    assert shard.digest() != before
    created = _call(channel, "CreateTable", memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(
        TableConfig(name="a/made", num_rows=8, width=4, seed=1, optimizer=OPT))), A_WRITE)
    assert created.config.name == "a/made"
    _call(channel, "DropTable", memory_pb2.DropTableRequest(name="a/made"), A_WRITE)


def test_token_check_and_namespaces():
    assert namespace_of("a/layer0/head1") == "a" and namespace_of("plain") == "" and namespace_of("/x") == ""
    check = TokenCheck((), (token_digest(ADMIN),), SecurityConfig.from_tokens(
        namespace_tokens={"a": {"read": [AB_MIXED], "write": [AB_MIXED]}, "b": {"read": [AB_MIXED]}}).namespace_tokens)
    caller = check.identify([("authorization", f"Bearer {AB_MIXED}")])
    assert caller == Caller(None, {"a": "write", "b": "read"}, token_digest(AB_MIXED))
    assert caller.may("a", "write") and caller.may("b", "read") and not caller.may("b", "write")
    assert not caller.may("", "read")
    assert check.identify([("authorization", f"Bearer {ADMIN}")]).is_cluster_wide
    assert check.identify([("authorization", "Bearer nobody")]) is None
    with pytest.raises(ValueError, match="without '/'"):
        SecurityConfig.from_tokens(namespace_tokens={"a/b": {"read": [A_READ]}})
    with pytest.raises(ValueError, match="read and/or write"):
        SecurityConfig.from_tokens(namespace_tokens={"a": {"admin": [A_READ]}})
