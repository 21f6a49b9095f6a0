"""The gRPC face of one shard: `MemoryServicer` converts messages to numpy arrays and config
dataclasses, calls the plain `Shard`, and converts back; `serve` runs it with the health service.

The servicer holds no table logic. It checks only what the Shard's Python API cannot see: the dtype
and width a message claims against the table's, payload lengths (budgets.py), and a table named
twice in one request. It decodes a whole multi-table Push before calling `Shard.push`, which
validates ids and applies all tables or none, so a rejected request changes no state. How fetched
rows travel back (in the response or a shared-memory file) is fetch_replies.py's.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memory_service.config import TableConfig
from memory_service.errors import InvalidArgument, MemoryServiceError, status_details
from memory_service.ops.metrics import MetricsServer, ShardMetrics, serve_metrics
from memory_service.ops.reports import ShardReport
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.server import budgets
from memory_service.server.admission import Admission, AdmissionLimits
from memory_service.server.event_loop import EventLoop
from memory_service.server.fetch_replies import FetchReplies, reply_nbytes
from memory_service.shard import checkpoint_files
from memory_service.shard.shard import Shard
from memory_service.tables import Announcement, TableInfo, TablePush
from memory_service.wire import codec, row_record_messages
from memory_service.wire.codec import MESSAGE_OPTIONS
from memory_service.wire.security import SecurityConfig, warn_if_exposed

SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name
# so_reuseport=0: a second server asking for a port in use fails instead of silently sharing it.
SERVER_OPTIONS = (*MESSAGE_OPTIONS, ("grpc.so_reuseport", 0))


def status_of(err: Exception) -> grpc.StatusCode | None:
    """The status a handler's exception travels as: a service error's own (`status`, which the
    client maps back to the same class), INVALID_ARGUMENT for the configs' ValueErrors; None for
    anything else (a bug: gRPC answers UNKNOWN)."""
    if isinstance(err, MemoryServiceError) and err.status is not None:
        return grpc.StatusCode[err.status]
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(err, ValueError) else None


def _maps_errors(method):
    """Abort the rpc with the status of a service error, its message as the details."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as err:
            if (code := status_of(err)) is None:
                raise
            context.abort(code, status_details(str(err)))
    return wrapper


def _observed(rpc: str):
    """Record the call's handling time and row ids (or its error) in the servicer's metrics."""
    def decorator(method):
        @functools.wraps(method)
        def wrapper(self, request, context):
            start = time.perf_counter()
            try:
                response = method(self, request, context)
            except Exception:  # an aborted rpc raises out of the handler
                self.metrics.observe_error(rpc)
                raise
            num_ids = sum(len(msg.ids) for msg in request.tables) // 8  # int64 ids
            self.metrics.observe(rpc, time.perf_counter() - start, num_ids)
            return response
        return wrapper
    return decorator


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Serves one `Shard` over gRPC. gRPC calls it from a thread pool: the Shard's lock
    serialises the requests."""

    def __init__(self, shard: Shard, max_fetch_wait_s: float = budgets.MAX_FETCH_WAIT_S) -> None:
        self.shard = shard
        self.max_fetch_wait_s = max_fetch_wait_s  # a held fetch's wait when its call set no deadline
        self.replies = FetchReplies()
        self.metrics = ShardMetrics()
        self.metrics_port = 0  # set by serve() once the Prometheus endpoint listens

    @_maps_errors
    def CreateTable(self, request, context):
        info = self.shard.create_table(codec.table_config_from_proto(request.config))
        return codec.table_info_to_proto(info)

    @_maps_errors
    def DescribeTable(self, request, context):
        return codec.table_info_to_proto(self.shard.describe_table(request.name))

    @_maps_errors
    def DropTable(self, request, context):
        self.shard.drop_table(request.name)
        return memory_pb2.DropTableResponse()

    @_maps_errors
    def ListTables(self, request, context):
        return memory_pb2.ListTablesResponse(names=sorted(self.shard.list_tables()))

    @_observed("fetch")
    @_maps_errors
    def Fetch(self, request, context):
        requests = _decode_ids(request.tables, "fetch")  # table -> ids (n,) int64
        configs = {name: self.shard.describe_table(name).config for name in requests}
        budgets.check_reply(reply_nbytes(requests, configs), "fetch")
        samples = _decode_ngrams(request.tables, requests, configs)  # checked before any row is read
        self.replies.open(request)  # before reading, so a retry counts once
        cancelled = threading.Event()  # set when the caller goes away while the fetch is held
        context.add_callback(lambda: self.shard.cancel_wait(cancelled))
        rows = self.shard.fetch(requests, request.min_step, budgets.wait_s(context, self.max_fetch_wait_s),
                                cancelled)  # table -> (n, width) f32
        self.shard.record_ngrams(samples)
        return self.replies.response(request, rows, configs)

    @_maps_errors
    def ExportRows(self, request, context):
        ids = codec.decode_ids(request.ids, request.table)
        budgets.check_rows([request], "export")
        self._check_records_reply(request.table, len(ids), "export")
        records = self.shard.export_rows(request.table, ids, request.version, request.client_id, request.request_seq)
        return codec.records_to_proto(request.table, records)

    def _check_records_reply(self, table: str, num_ids: int, rpc: str) -> None:
        """RESOURCE_EXHAUSTED when `num_ids` records of `table` would not fit one reply."""
        width = self.shard.describe_table(table).config.width
        budgets.check_reply(num_ids * codec.record_nbytes(width, self.shard.state_width(table)), rpc)

    @_maps_errors
    def ImportRows(self, request, context):
        name = request.records.table
        budgets.check_rows([request, request.records], "import")
        cfg = self.shard.describe_table(name).config
        records = codec.records_from_proto(request.records, cfg.stored_width, self.shard.state_width(name))
        self.shard.import_rows(name, records, request.version, codec.decode_ids(request.ids, name))
        return memory_pb2.ImportRowsResponse()

    @_maps_errors
    def WriteRecords(self, request, context):
        name = request.records.table
        budgets.check_rows([request.records], "write records")
        return memory_pb2.WriteRecordsResponse(rows_written=self.shard.write_records(
            name, *row_record_messages.records_from_request(request, self.shard.describe_table(name).config.width,
                                                            self.shard.state_width(name))))

    @_maps_errors
    def ReadRecords(self, request, context):
        ids = codec.decode_ids(request.ids, request.table)
        budgets.check_rows([request], "read records")
        self._check_records_reply(request.table, len(ids), "read records")
        reply = codec.records_to_proto(request.table, self.shard.read_records(request.table, ids))
        reply.state_width = self.shard.state_width(request.table)
        if request.with_log:
            reply.log.CopyFrom(row_record_messages.log_to_proto(self.shard.step_log(request.table)))
        return reply

    @_maps_errors
    def ReturnRows(self, request, context):
        budgets.check_rows([request], "return")
        ids = codec.decode_ids(request.ids, request.table)
        returned = self.shard.return_rows(request.table, ids, request.version, request.client_id, request.request_seq)
        return memory_pb2.ReturnRowsResponse(rows_returned=returned)

    @_maps_errors
    def HotMap(self, request, context):
        version, ids = self.shard.hot_map(request.table)
        return memory_pb2.HotMapResponse(version=version, ids=codec.encode_ids(ids))

    @_maps_errors
    def DrainAccesses(self, request, context):
        return memory_pb2.DrainAccessesResponse(tables=[
            _accesses_to_proto(name, events) for name, events in self.shard.drain_accesses().items()])

    @_maps_errors
    def Announce(self, request, context):
        requests = _decode_ids(request.tables, "announce")  # table -> ids (n,) int64
        if requests:
            self.shard.announce(requests, request.step if request.HasField("step") else None)
        if request.direct_reads:
            self.shard.note_direct_reads(_decode_ids(request.direct_reads, "announce"), request.direct_fetches,
                                         *_decode_direct_counts(request))
        return memory_pb2.AnnounceResponse()

    @_maps_errors
    def DirectReads(self, request, context):
        path, nonce = self.shard.direct_reads()
        return memory_pb2.DirectReadsResponse(path=path, nonce=nonce)

    @_maps_errors
    def CheckpointPause(self, request, context):
        if not request.pause:
            return memory_pb2.CheckpointPauseResponse(held=self.shard.moves.resume())
        self.shard.moves.pause(request.lease_seconds, request.timeout_seconds)
        return memory_pb2.CheckpointPauseResponse(held=True)

    @_maps_errors
    def CheckpointSave(self, request, context):
        part = checkpoint_files.save_shard(self.shard, request.path, request.step, list(request.tables),
                                           request.wait_seconds)
        return memory_pb2.CheckpointSaveResponse(
            role=part.role, shard_id=part.shard_id, num_shards=part.num_shards,
            files=[memory_pb2.CheckpointFile(path=f.path, bytes=f.bytes, sha256=f.sha256, kind=f.kind,
                                             table=f.table, rows=f.rows) for f in part.files])

    @_maps_errors
    def CheckpointRestore(self, request, context):
        restored = checkpoint_files.restore_shard(self.shard, request.path)
        return memory_pb2.CheckpointRestoreResponse(tables=[
            memory_pb2.CheckpointTableRows(table=name, rows=rows) for name, rows in restored.items()])

    @_maps_errors
    def FreezeTable(self, request, context):
        info = self.shard.freeze_table(request.table, request.quantization)
        return memory_pb2.FreezeTableResponse(table=codec.table_info_to_proto(info))

    @_observed("push")
    @_maps_errors
    def Push(self, request, context):
        if not request.client_id:
            raise InvalidArgument("push: client_id must be non-empty")
        budgets.check_rows([*request.tables, *request.announce.tables], "push")
        pushes = {}  # table -> TablePush, all decoded before the shard sees any
        for msg in request.tables:
            _check_once(pushes, msg.table, "push")
            pushes[msg.table] = _decode_push(msg, self.shard.describe_table(msg.table))
        announce = _decode_announce(request.announce) if request.HasField("announce") else None
        rows_updated = self.shard.push(request.client_id, pushes, max(1, request.contributors),
                                       commit=not request.commit_later, request_seq=request.request_seq,
                                       announce=announce)
        return memory_pb2.PushResponse(rows_updated=rows_updated)

    @_maps_errors
    def CommitStep(self, request, context):
        if not request.client_id:
            raise InvalidArgument("commit: client_id must be non-empty")
        steps = {}
        for msg in request.tables:
            _check_once(steps, msg.table, "commit")
            steps[msg.table] = (msg.step, _lr(msg))
        updated = self.shard.commit(request.client_id, steps, max(1, request.contributors),
                                    request_seq=request.request_seq)
        return memory_pb2.CommitStepResponse(rows_updated=updated)

    @_maps_errors
    def Stats(self, request, context):
        return codec.shard_report_to_proto(self.report())

    def report(self) -> ShardReport:
        """The shard's utilization now: what Stats returns and Prometheus scrapes."""
        return ShardReport(shard_id=self.shard.shard_id, num_shards=self.shard.num_shards,
                           uptime_s=self.metrics.uptime_s,
                           counters=dataclasses.replace(self.shard.counters),
                           fetch=self.metrics.window("fetch"), push=self.metrics.window("push"),
                           tables=self.shard.usage(), metrics_port=self.metrics_port,
                           role=self.shard.homes.role, wal_replayed=self.shard.journal.replayed)


def _decode_ids(messages, rpc: str) -> dict[str, np.ndarray]:
    """{table: ids (n,) int64} of a request's table messages, within the request's budget, each
    table named once."""
    budgets.check_rows(messages, rpc)
    requests = {}
    for msg in messages:
        _check_once(requests, msg.table, rpc)
        requests[msg.table] = codec.decode_ids(msg.ids, msg.table)
    return requests


def _decode_announce(msg: memory_pb2.AnnounceRequest) -> Announcement:
    """The announcement a push carries (ids per table, each named once; its step if set)."""
    if msg.direct_reads:
        raise InvalidArgument("push: an announcement riding on a push carries no direct_reads "
                              "(report them with Announce)")
    return Announcement(_decode_ids(msg.tables, "announce"), msg.step if msg.HasField("step") else None)


def _decode_direct_counts(msg: memory_pb2.AnnounceRequest) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """Per table of msg.direct_reads: the fetches that named it and the ids computed from the
    seed (None where the client sent no counts: an older client)."""
    names = [t.table for t in msg.direct_reads]
    out = []
    for raw, dtype in ((msg.direct_table_reads, "<u4"), (msg.direct_computed, "<u8")):
        if not raw:
            out.append(None)
            continue
        if len(raw) != len(names) * np.dtype(dtype).itemsize:
            raise InvalidArgument(f"announce: {len(raw)} bytes of direct-read counts for {len(names)} tables")
        out.append(dict(zip(names, np.frombuffer(raw, dtype).tolist())))
    return out[0], out[1]


def _decode_ngrams(messages, requests: dict[str, np.ndarray], configs: dict[str, TableConfig]) -> dict:
    """{table: (ids, NgramBatch)} of the tables whose ids carry the N-grams behind them."""
    samples = {}
    for msg in messages:
        if not msg.HasField("ngrams"):
            continue
        if not configs[msg.table].collision_sample_rate:
            raise InvalidArgument(f"table {msg.table!r}: ngrams sent but the table's "
                                  f"collision_sample_rate is 0 (collision stats off)")
        ids = requests[msg.table]
        samples[msg.table] = (ids, codec.decode_ngrams(msg.ngrams, ids, msg.table))
    return samples


def _accesses_to_proto(name: str, events: list[tuple[int, np.ndarray]]) -> memory_pb2.TableAccesses:
    """One table's (tag, ids) access events as the ids of all of them, each one's length and tag."""
    ids = [e[1] for e in events]
    return memory_pb2.TableAccesses(
        table=name, ids=codec.encode_ids(np.concatenate(ids) if ids else np.empty(0, np.int64)),
        lengths=codec.encode_ids(np.array([len(i) for i in ids], np.int64)),
        tags=codec.encode_ids(np.array([e[0] for e in events], np.int64)))


def _check_once(seen: dict, table: str, rpc: str) -> None:
    if table in seen:
        raise InvalidArgument(f"{rpc}: table {table!r} appears more than once in one request")


def _decode_push(msg: memory_pb2.TableGrads, info: TableInfo) -> TablePush:
    """One table's gradients -> TablePush, after checking dtype, width and payload lengths against
    the table's config."""
    cfg = info.config
    dtype = codec.dtype_from_proto(msg.dtype, f"table {cfg.name!r}")
    if dtype != cfg.dtype:
        raise InvalidArgument(f"table {cfg.name!r}: grads dtype {dtype} does not match the table's "
                              f"dtype {cfg.dtype}")
    if msg.width != cfg.width:
        raise InvalidArgument(f"table {cfg.name!r}: grads width {msg.width} does not match the "
                              f"table's width {cfg.width}")
    ids = codec.decode_ids(msg.ids, cfg.name)  # (n,) int64
    grads = codec.decode_rows(msg.grads, len(ids), cfg.width, dtype, cfg.name)  # (n, width) float32
    return TablePush(step=msg.step, ids=ids, grads=grads, lr=_lr(msg))


def _lr(msg: memory_pb2.TableGrads | memory_pb2.TableStep) -> float | None:
    """The learning rate a push or commit carries: None when it carries none (the table's
    configured lr); 0.0 is a zero step, not "configured"."""
    return msg.lr if msg.HasField("lr") else None


@dataclass
class ShardServer:
    """A running gRPC server of one shard. `port` is the bound port (never 0)."""

    server: aio.Server
    health: health.aio.HealthServicer
    host: str
    port: int
    metrics: MetricsServer | None = None  # the Prometheus endpoint, when serve() started one
    loop: EventLoop | None = None
    executors: tuple[ThreadPoolExecutor, ...] = ()
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        """'host:port', what grpc channels take."""
        return _address(self.host, self.port)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, finish in-flight rpcs for up to `grace` seconds, and stop."""
        if self._stopped.is_set():
            return
        self.loop.run(self.health.enter_graceful_shutdown())
        self.loop.run(self.server.stop(grace))
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)
        self.loop.close()
        self._stopped.set()
        if self.metrics is not None:
            self.metrics.stop()

    def wait(self) -> None:
        """Block until the server stops."""
        self._stopped.wait()


def serve(shard: Shard, host: str = "127.0.0.1", port: int = 0, max_workers: int = 16,
          metrics_port: int | None = None, cluster: str = "default",
          security: SecurityConfig | None = None, admission: AdmissionLimits | None = None,
          max_fetch_wait_s: float = budgets.MAX_FETCH_WAIT_S) -> ShardServer:
    """Serve `shard` and the grpc.health.v1 service on host:port (port 0 picks a free port), and
    with `metrics_port` its Prometheus endpoint on security.metrics_host (None: `host`):metrics_port
    (0: a free port), labelled with the tables cluster's name.

    A grpc.aio server: requests are received on its event loop and admitted (admission.py: the
    token, the per-client and total bounds `admission`, RESOURCE_EXHAUSTED over them) before any
    thread is held; the servicer's methods run on `max_workers` threads, held fetches (min_step)
    on threads of their own (`admission.held` of them), each waiting at most `max_fetch_wait_s`
    when its call set no deadline, and ending when its client goes away.

    `security`: TLS and tokens (memory_service.wire.security; None: open, as the loopback default
    needs). Serving a non-loopback host without TLS warns. The Prometheus endpoint asks for a bearer
    token when security.metrics_token_digest is set (it shows counts, never rows)."""
    security = security if security is not None else SecurityConfig()
    admission = admission if admission is not None else AdmissionLimits()
    warn_if_exposed(host, security)
    workers = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="shard-rpc")
    held_workers = ThreadPoolExecutor(max_workers=admission.held, thread_name_prefix="shard-held")
    loop = EventLoop()
    servicer = MemoryServicer(shard, max_fetch_wait_s)
    try:
        server, health_servicer, bound = loop.run(_start(
            servicer, Admission(admission, security.token_check(), workers, held_workers, shard.busy), security,
            _address(host, port)))
    except BaseException:
        loop.close()
        raise
    served = ShardServer(server, health_servicer, host, bound, None, loop, (workers, held_workers))
    if metrics_port is not None:
        try:
            served.metrics = serve_metrics(servicer.report, servicer.metrics, cluster,
                                           security.metrics_host or host, metrics_port,
                                           token_digest=security.metrics_token_digest)
        except OSError:
            served.stop(None)
            raise
        servicer.metrics_port = served.metrics.port
    return served


async def _start(servicer: MemoryServicer, admission: Admission, security: SecurityConfig, address: str):
    """(the started aio server, its health servicer, the bound port), on the server's loop."""
    server = aio.server(options=SERVER_OPTIONS, interceptors=[admission])
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, server)
    health_servicer = await _add_health(server)
    bound = security.add_port(server, address)  # raises RuntimeError if it cannot bind
    await server.start()
    return server, health_servicer, bound


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 hosts go in brackets


async def _add_health(server: aio.Server) -> health.aio.HealthServicer:
    """The standard health service, SERVING for the whole server ("") and for MemoryService."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for service in ("", SERVICE_NAME):
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return servicer
