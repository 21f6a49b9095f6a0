"""TLS and scoped tokens on real gRPC servers over 127.0.0.1, with certificates generated here: a
CA, a server certificate for 127.0.0.1/localhost, client certificates from that CA and from a
stranger's CA. Each refusal is checked for its status and that the shard's digest did not move."""
from __future__ import annotations

import datetime
import ipaddress
import warnings
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import ray
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.wire import codec
from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import PermissionDenied, Unauthenticated
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.wire.security import (ClientSecurity, InsecureBindWarning, SecurityConfig, is_loopback,
                                     method_scope, token_digest)
from memory_service.server.servicer import SERVICE_NAME, serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

Code = grpc.StatusCode
READ, WRITE = "read-token-0123", "write-token-4567"
EMB = TableConfig(name="emb", num_rows=1000, width=8, seed=1, optimizer=OptimizerConfig(kind="sparse_adam", lr=0.01))


# --- certificates ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: bytes  # PEM of the CA that signs the server and the client
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    stranger_ca: bytes  # another CA, and a client certificate it signed
    stranger_cert: bytes
    stranger_key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(name: str, key, issuer_name: str, issuer_key, ca: bool = False, sans=(), usages=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key, stranger_key, server_key, client_key, other_key = (_key() for _ in range(5))
    ca = _cert("engram test CA", ca_key, "engram test CA", ca_key, ca=True)
    stranger = _cert("stranger CA", stranger_key, "stranger CA", stranger_key, ca=True)
    # serverAuth and clientAuth: a shard's certificate also identifies it to other shards (migration)
    server = _cert("engram shard", server_key, "engram test CA", ca_key,
                   sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
                   usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client = _cert("trainer", client_key, "engram test CA", ca_key, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    other = _cert("intruder", other_key, "stranger CA", stranger_key, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    return Pki(_pem(ca), _pem(server), _pem_key(server_key), _pem(client), _pem_key(client_key),
               _pem(stranger), _pem(other), _pem_key(other_key))


# --- servers --------------------------------------------------------------------------------------

def _primed_shard() -> Shard:
    """Shard 0 of 2 with table emb holding rows and Adam state."""
    shard = Shard(0, 2)
    shard.create_table(EMB)
    shard.push("setup", {"emb": TablePush(1, np.array([0, 2, 4]), np.ones((3, 8), np.float32))})
    return shard


@pytest.fixture
def shard() -> Shard:
    return _primed_shard()


@pytest.fixture
def tls_server(shard, pki):
    """TLS (no client certificates) and tokens."""
    server = serve(shard, security=SecurityConfig.from_tokens([READ], [WRITE], cert=pki.server_cert,
                                                               key=pki.server_key))
    yield server
    server.stop(None)


@pytest.fixture
def mtls_server(shard, pki):
    """Mutual TLS: clients need a certificate the test CA signed; tokens too."""
    server = serve(shard, security=SecurityConfig.from_tokens([READ], [WRITE], cert=pki.server_cert,
                                                               key=pki.server_key, client_ca=pki.ca))
    yield server
    server.stop(None)


def _stub(server, security: ClientSecurity | None) -> tuple[grpc.Channel, memory_pb2_grpc.MemoryServiceStub]:
    channel = (security.channel(server.address, codec.MESSAGE_OPTIONS) if security
               else grpc.insecure_channel(server.address, options=codec.MESSAGE_OPTIONS))
    return channel, memory_pb2_grpc.MemoryServiceStub(channel)


def _push(step: int = 2) -> memory_pb2.PushRequest:
    grads = np.full((2, 8), 0.5, np.float32)
    return memory_pb2.PushRequest(client_id="t", tables=[memory_pb2.TableGrads(
        table="emb", step=step, dtype=memory_pb2.DTYPE_FLOAT32, width=8, ids=codec.encode_ids(np.array([0, 6])),
        grads=codec.encode_rows(grads, "float32"))])


FETCH = memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="emb", ids=codec.encode_ids(np.array([0, 2])))])


def _code(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=10)
    return err.value.code()


# --- tokens ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [None, "not-a-token", READ + "x"], ids=["none", "wrong", "prefix"])
@pytest.mark.parametrize("rpc", ["Fetch", "Push"])
def test_missing_or_wrong_token_is_unauthenticated(tls_server, pki, shard, token, rpc):
    digest = shard.digest()
    channel, stub = _stub(tls_server, ClientSecurity(root_cert=pki.ca, token=token))
    with channel:
        assert _code(getattr(stub, rpc), FETCH if rpc == "Fetch" else _push()) == Code.UNAUTHENTICATED
    assert shard.digest() == digest


def test_read_token_reads(tls_server, pki):
    channel, stub = _stub(tls_server, ClientSecurity(root_cert=pki.ca, token=READ))
    with channel:
        rows = stub.Fetch(FETCH, timeout=10).tables[0]
        assert len(rows.rows) == 2 * 8 * 4
        assert stub.Stats(memory_pb2.StatsRequest(), timeout=10).counters.fetch_requests == 1
        assert stub.DescribeTable(memory_pb2.DescribeTableRequest(name="emb"), timeout=10).step == 1
        assert list(stub.ListTables(memory_pb2.ListTablesRequest(), timeout=10).names) == ["emb"]
        assert stub.HotMap(memory_pb2.HotMapRequest(table="emb"), timeout=10).version == 0
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


WRITES = {
    "Push": _push(),
    "CommitStep": memory_pb2.CommitStepRequest(client_id="t", tables=[memory_pb2.TableStep(table="emb", step=2)]),
    "CreateTable": memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(
        TableConfig(name="new", num_rows=10, width=2))),
    "DropTable": memory_pb2.DropTableRequest(name="emb"),
    "ExportRows": memory_pb2.ExportRowsRequest(table="emb", ids=codec.encode_ids(np.array([0])), version=1),
    "ImportRows": memory_pb2.ImportRowsRequest(records=memory_pb2.RowRecords(table="emb")),
    "ReturnRows": memory_pb2.ReturnRowsRequest(table="emb", ids=codec.encode_ids(np.array([0])), version=1,
                                               client_id="m", request_seq=1),
    "DrainAccesses": memory_pb2.DrainAccessesRequest(),
}


@pytest.mark.parametrize("rpc", list(WRITES))
def test_read_token_on_a_write_rpc_is_permission_denied(tls_server, pki, shard, rpc):
    digest, tables = shard.digest(), shard.list_tables()
    channel, stub = _stub(tls_server, ClientSecurity(root_cert=pki.ca, token=READ))
    with channel:
        assert _code(getattr(stub, rpc), WRITES[rpc]) == Code.PERMISSION_DENIED
    assert shard.digest() == digest and shard.list_tables() == tables


def test_write_token_writes_and_reads(tls_server, pki, shard):
    digest = shard.digest()
    channel, stub = _stub(tls_server, ClientSecurity(root_cert=pki.ca, token=WRITE))
    with channel:
        assert stub.Push(_push(), timeout=10).rows_updated == 2
        assert shard.digest() != digest
        assert len(stub.Fetch(FETCH, timeout=10).tables[0].rows) == 64


def test_an_rpc_unknown_to_the_scopes_needs_a_write_token(tls_server, pki):
    # a method added later (a checkpoint rpc, say) is write scope until listed as a read
    assert method_scope(f"/{SERVICE_NAME}/SaveCheckpoint") == "write"
    assert method_scope(f"/{SERVICE_NAME}/Fetch") == "read"
    method = f"/{SERVICE_NAME}/SaveCheckpoint"
    for token, code in ((READ, Code.PERMISSION_DENIED), (WRITE, Code.UNIMPLEMENTED), (None, Code.UNAUTHENTICATED)):
        channel, _ = _stub(tls_server, ClientSecurity(root_cert=pki.ca, token=token))
        with channel:
            assert _code(channel.unary_unary(method), b"") == code


def test_tokens_without_tls_on_loopback(shard):
    server = serve(shard, security=SecurityConfig.from_tokens([READ], [WRITE]))
    try:
        for token, code in ((READ, Code.PERMISSION_DENIED), (None, Code.UNAUTHENTICATED)):
            channel, stub = _stub(server, ClientSecurity(token=token))
            with channel:
                assert _code(stub.Push, _push()) == code
        channel, stub = _stub(server, ClientSecurity(token=WRITE))
        with channel:
            assert stub.Push(_push(), timeout=10).rows_updated == 2
    finally:
        server.stop(None)


def test_garbage_from_an_unauthenticated_caller_is_refused_unread(tls_server, pki):
    channel, _ = _stub(tls_server, ClientSecurity(root_cert=pki.ca))
    with channel:
        assert _code(channel.unary_unary(f"/{SERVICE_NAME}/Push"), b"\xff\xff\xff") == Code.UNAUTHENTICATED


def test_memory_client_raises_the_scope_errors(tls_server, pki):
    with MemoryClient([tls_server.address], security=ClientSecurity(root_cert=pki.ca, token=READ),
                      shared_memory=False, timeout=10) as client:
        assert client.fetch({"emb": np.array([0, 2])})["emb"].shape == (2, 8)
        with pytest.raises(PermissionDenied, match="needs a write token"):
            client.push({"emb": (np.array([0]), np.ones((1, 8)))}, step=2)
    with MemoryClient([tls_server.address], security=ClientSecurity(root_cert=pki.ca), timeout=10) as client:
        with pytest.raises(Unauthenticated, match="missing or invalid token"):
            client.table("emb")


# --- TLS ------------------------------------------------------------------------------------------

def test_plaintext_client_on_a_tls_server_is_unavailable(tls_server, shard):
    digest = shard.digest()
    channel, stub = _stub(tls_server, None)
    with channel:
        assert _code(stub.Push, _push()) == Code.UNAVAILABLE
    assert shard.digest() == digest


def test_a_server_certificate_from_an_unknown_ca_is_refused(tls_server, pki):
    channel, stub = _stub(tls_server, ClientSecurity(root_cert=pki.stranger_ca, token=WRITE))
    with channel:
        assert _code(stub.Fetch, FETCH) == Code.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_of_the_ca(mtls_server, pki, shard):
    digest = shard.digest()
    for security in (ClientSecurity(root_cert=pki.ca, token=WRITE),  # no client certificate
                     ClientSecurity(root_cert=pki.ca, token=WRITE, client_cert=pki.stranger_cert,
                                    client_key=pki.stranger_key)):  # signed by the wrong CA
        channel, stub = _stub(mtls_server, security)
        with channel:
            assert _code(stub.Push, _push()) == Code.UNAVAILABLE
    assert shard.digest() == digest
    channel, stub = _stub(mtls_server, ClientSecurity(root_cert=pki.ca, token=WRITE, client_cert=pki.client_cert,
                                                      client_key=pki.client_key))
    with channel:
        assert stub.Push(_push(), timeout=10).rows_updated == 2
    assert shard.digest() != digest


def test_pem_files_are_read_by_path(tmp_path, pki, shard):
    paths = {}
    for name in ("server_cert", "server_key", "ca"):
        paths[name] = str(tmp_path / f"{name}.pem")
        (tmp_path / f"{name}.pem").write_bytes(getattr(pki, name))
    server = serve(shard, security=SecurityConfig(cert=paths["server_cert"], key=paths["server_key"]))
    try:
        channel, stub = _stub(server, ClientSecurity(root_cert=paths["ca"]))
        with channel:
            assert stub.ListTables(memory_pb2.ListTablesRequest(), timeout=10).names == ["emb"]
    finally:
        server.stop(None)


# --- configs, warnings and the message limit ------------------------------------------------------

def test_configs_are_checked():
    with pytest.raises(ValueError, match="cert and key go together"):
        SecurityConfig(cert=b"x")
    with pytest.raises(ValueError, match="sha256 hex digests"):
        SecurityConfig(read_token_digests=("secret",))
    with pytest.raises(ValueError, match="visible ASCII"):
        token_digest("two words")
    with pytest.raises(ValueError, match="needs the server's cert"):
        SecurityConfig(client_ca=b"x")
    assert "secret-token" not in repr(ClientSecurity(token="secret-token"))
    with pytest.raises(ValueError, match="would cross the network in clear"):
        ClientSecurity(token="t").channel("10.1.2.3:50051")  # tokens travel over TLS or loopback only
    from memory_service.cluster import ClusterConfig

    with pytest.raises(ValueError, match="tokens without TLS on host 0.0.0.0"):
        ClusterConfig(host="0.0.0.0", security=SecurityConfig.from_tokens([READ], [WRITE]))
    assert SecurityConfig().is_open and not SecurityConfig.from_tokens([READ]).is_open


def test_binding_beyond_loopback_without_tls_warns(shard, pki):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("shard-0")
    with pytest.warns(InsecureBindWarning, match="serving gRPC on 0.0.0.0 without TLS"):
        server = serve(shard, host="0.0.0.0")
    server.stop(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: loopback, or TLS
        serve(shard).stop(None)
        serve(shard, host="0.0.0.0", security=SecurityConfig(cert=pki.server_cert, key=pki.server_key)).stop(None)


def test_a_message_over_the_limit_is_resource_exhausted(tls_server, pki, shard):
    digest = shard.digest()
    security = ClientSecurity(root_cert=pki.ca, token=WRITE)
    options = (("grpc.max_send_message_length", 2 * codec.MAX_MESSAGE_BYTES),)  # the client would send it
    with security.channel(tls_server.address, options) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        request = memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="emb", ids=bytes(codec.MAX_MESSAGE_BYTES))])
        assert request.ByteSize() > codec.MAX_MESSAGE_BYTES
        assert _code(stub.Fetch, request) == Code.RESOURCE_EXHAUSTED
        assert stub.ListTables(memory_pb2.ListTablesRequest(), timeout=10).names == ["emb"]  # still serving
    assert shard.digest() == digest


# --- through Ray shard actors ---------------------------------------------------------------------

def test_a_ray_cluster_with_tls_and_tokens(make_cluster, pki):
    """Two cold shards and a hot one, TLS + tokens; the hot shard's migration reaches the cold
    shards with its peer credentials (server certificate as client certificate, write token)."""
    peer = ClientSecurity(root_cert=pki.ca, token=WRITE, client_cert=pki.server_cert, client_key=pki.server_key)
    security = SecurityConfig.from_tokens([READ], [WRITE], cert=pki.server_cert, key=pki.server_key,
                                          client_ca=pki.ca, peer=peer)
    cluster = make_cluster(2, num_hot=1, hot_rows=64, migrate_interval_s=0.01, security=security)
    writer = ClientSecurity(root_cert=pki.ca, token=WRITE, client_cert=pki.client_cert, client_key=pki.client_key)
    cfg = TableConfig(name="secure", num_rows=10_000, width=4, optimizer=OptimizerConfig(kind="sgd", lr=0.1))
    ids = np.arange(0, 200, 3)
    hot = cluster.hot_actors[0]
    with cluster.client(security=writer) as client:
        client.create_table(cfg)
        before = client.fetch({"secure": ids})["secure"].numpy()
        step = 0
        while step < 10 or (step < 200 and not ray.get(hot.migration_counters.remote())["promoted"]):
            step += 1  # reads make rows hot: migration moves them under TLS + tokens
            client.push({"secure": (ids, np.ones((len(ids), 4), np.float32))}, step=step)
            rows = client.fetch({"secure": ids}, min_step=step)["secure"].numpy()
        np.testing.assert_allclose(rows, before - step * 0.1, rtol=1e-5, atol=1e-5)
        counters = ray.get(hot.migration_counters.remote())
        assert counters["error"] == "" and counters["promoted"] > 0, counters
    reader = ClientSecurity(root_cert=pki.ca, token=READ, client_cert=pki.client_cert, client_key=pki.client_key)
    with cluster.client(security=reader) as client:
        np.testing.assert_array_equal(client.fetch({"secure": ids})["secure"].numpy(), rows)
        with pytest.raises(PermissionDenied):
            client.push({"secure": (ids, np.ones((len(ids), 4)))}, step=step + 1)
    with ClientSecurity(root_cert=pki.ca, token=WRITE).channel(cluster.targets[0]) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)  # no client certificate: no handshake
        assert _code(stub.Stats, memory_pb2.StatsRequest()) == Code.UNAVAILABLE


# --- the CLI --------------------------------------------------------------------------------------

def test_engram_stats_reaches_a_tls_server_with_the_token_from_the_environment(tls_server, pki, tmp_path):
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "ca.pem").write_bytes(pki.ca)
    command = [sys.executable, "-m", "trainer.cli", "stats", "--targets", tls_server.address, "--json",
               "--tls-ca", str(tmp_path / "ca.pem")]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "ENGRAM_TOKEN": READ})
    assert ok.returncode == 0, ok.stderr
    assert [t["name"] for t in json.loads(ok.stdout)["tables"]] == ["emb"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"})
    assert refused.returncode != 0 and "missing or invalid token" in refused.stderr


def test_engram_serve_parses_tls_flags_and_token_variables(monkeypatch, tmp_path):
    """The serve command's own path (flags -> config overrides -> ClusterConfig.security): PEM
    files read by the launcher, tokens from the environment, a contradiction one ConfigError."""
    from memory_service.config_file import ConfigError, load_cluster_config
    from trainer.cli import build_parser
    from trainer.cli.serving import serve_overrides

    def security(*argv):
        return load_cluster_config(None, serve_overrides(build_parser().parse_args(["serve", *argv]))).security

    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_bytes(name.encode())
    monkeypatch.delenv("ENGRAM_READ_TOKENS", raising=False)
    monkeypatch.delenv("ENGRAM_WRITE_TOKENS", raising=False)
    assert security() is None  # the open default
    monkeypatch.setenv("ENGRAM_READ_TOKENS", "r1,r2")
    with pytest.raises(ConfigError, match="without \\$ENGRAM_WRITE_TOKENS"):
        security()
    monkeypatch.setenv("ENGRAM_WRITE_TOKENS", "w1")
    got = security("--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"),
                   "--tls-client-ca", str(tmp_path / "ca.pem"))
    assert got.read_token_digests == (token_digest("r1"), token_digest("r2"))
    assert got.write_token_digests == (token_digest("w1"),)
    assert (got.cert, got.key, got.client_ca) == (b"c.pem", b"k.pem", b"ca.pem")
    assert got.peer == ClientSecurity(root_cert=b"c.pem", token="w1", client_cert=b"c.pem", client_key=b"k.pem")
