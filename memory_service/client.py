"""MemoryClient: the trainer's side of the table service.

One fetch or push call covers several tables: ids are deduplicated, routed to their shards
(row r lives on shard r % N), sent as one request per shard (split when larger than
`max_rows_per_request`), concurrently, and the rows reassembled into the caller's order and shape.
"""
from __future__ import annotations

import dataclasses
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from memory_service import collisions, reply_buffer, wire
from memory_service.config import TableConfig
from memory_service.errors import InvalidArgument, MemoryServiceError, TableExists, TableNotFound
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.sharding import shard_of
from memory_service.utilization import ClusterReport

_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: TableNotFound,
           grpc.StatusCode.ALREADY_EXISTS: TableExists}


@dataclass(frozen=True)
class _Route:
    """One table's ids, deduplicated and grouped by shard: `grouped` holds the distinct ids with
    shard 0's first, then shard 1's, ...; `bounds[s]:bounds[s+1]` is shard s's slice of it."""
    grouped: np.ndarray  # (u,) int64 distinct ids, grouped by shard
    index: np.ndarray  # (n,) caller position -> position in `grouped`
    shape: tuple[int, ...]  # the caller's ids shape
    bounds: np.ndarray  # (num_shards + 1,) slice bounds per shard
    ngrams: collisions.NgramBatch | None = None  # the N-grams behind `grouped`'s lookups


def _raise(err: grpc.RpcError) -> None:
    cls = _ERRORS.get(err.code(), MemoryServiceError)
    raise cls(err.details()) from None


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise InvalidArgument(f"row ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


class MemoryClient:
    """Client of one tables cluster given its shards' gRPC targets in shard order."""

    def __init__(self, targets: list[str], max_rows_per_request: int = 65536, timeout: float = 60.0,
                 client_id: str | None = None, max_workers: int = 8, shared_memory: bool = True):
        if not targets:
            raise ValueError("MemoryClient needs at least one shard target")
        if max_rows_per_request < 1:
            raise ValueError(f"max_rows_per_request {max_rows_per_request} must be >= 1")
        self.targets = list(targets)
        self.channels = [grpc.insecure_channel(t, options=wire.MESSAGE_OPTIONS) for t in self.targets]
        self.stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in self.channels]
        self.max_rows_per_request = max_rows_per_request
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memory-client")
        # rpcs get threads of their own: a fetch_async on `pool` waits on its rpcs
        self.rpc_pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(targets)), thread_name_prefix="memory-rpc")
        self.tables: dict[str, TableConfig] = {}
        # Same-host fast path: rows come back through shared memory until a shard says it cannot
        # open the file (it runs on another host); then that shard's rows come over gRPC.
        self.replies = reply_buffer.ReplyBufferPool() if shared_memory and reply_buffer.available() else None
        self.same_host = [True] * len(self.targets)

    @property
    def num_shards(self) -> int:
        return len(self.stubs)

    # -- tables ---------------------------------------------------------------------------------
    def create_table(self, cfg: TableConfig) -> None:
        """Create `cfg` on every shard (idempotent for an identical config)."""
        request = memory_pb2.CreateTableRequest(config=wire.table_config_to_proto(cfg))
        self._all(lambda stub: self._call(stub.CreateTable, request))
        self.tables[cfg.name] = cfg

    def drop_table(self, name: str) -> None:
        request = memory_pb2.DropTableRequest(name=name)
        self._all(lambda stub: self._call(stub.DropTable, request))
        self.tables.pop(name, None)

    def table(self, name: str) -> TableConfig:
        """The table's config, asked of shard 0 once and cached."""
        if name not in self.tables:
            try:
                info = self.stubs[0].DescribeTable(memory_pb2.DescribeTableRequest(name=name), timeout=self.timeout)
            except grpc.RpcError as err:
                _raise(err)
            self.tables[name] = wire.table_config_from_proto(info.config)
        return self.tables[name]

    def stats(self) -> list:
        """One StatsResponse per shard, in shard order."""
        return self._all(lambda stub: self._call(stub.Stats, memory_pb2.StatsRequest()))

    def report(self) -> ClusterReport:
        """Every shard's utilization and what they add up to (what `engram stats` prints)."""
        return ClusterReport(tuple(wire.shard_report_from_proto(r) for r in self.stats()))

    def samples_collisions(self, name: str) -> bool:
        """Whether fetches of table `name` should carry N-gram fingerprints (its
        collision_sample_rate > 0); callers skip computing them otherwise."""
        return self.table(name).collision_sample_rate > 0

    # -- rows -----------------------------------------------------------------------------------
    def fetch(self, ids: dict[str, np.ndarray | torch.Tensor],
              ngrams: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        """Rows of several tables: {table: ids (any shape)} -> {table: float32 (*shape, width)}.

        `ngrams`: {table: uint64 fingerprints shaped like its ids} of the N-grams behind the
        lookups (trainer.fingerprint), sent along for the tables' collision stats; ignored for
        tables with collision stats off (see `samples_collisions`)."""
        routes = {name: self._route(name, table_ids) for name, table_ids in ids.items()}
        for name, fingerprints in (ngrams or {}).items():
            if name not in routes:
                raise InvalidArgument(f"ngrams given for table {name!r}, which this fetch does not read")
            routes[name] = self._with_ngrams(name, routes[name], fingerprints)
        requests = self._requests(routes)  # [(shard, [(table, start, stop)])]
        # Layout of every table's distinct rows, shards side by side: one gather makes the result.
        bases, end = {}, 0
        for name, route in routes.items():
            bases[name] = end
            end = reply_buffer.aligned(end + len(route.grouped) * self._row_bytes(name))
        shm = (self.replies is not None and end >= reply_buffer.MIN_REPLY_BYTES
               and any(self.same_host[shard] for shard, _ in requests))
        buffer = self.replies.acquire(end) if shm else None
        try:
            grouped = {name: self._grouped_view(name, buffer, bases[name], len(r.grouped)) for name, r in routes.items()}
            sent = [(shard, chunk, self._send_fetch(routes, shard, chunk, buffer, bases))
                    for shard, chunk in requests]
            for shard, chunk, future in sent:
                response, via_shm = self._fetch_result(routes, shard, chunk, buffer, bases, future)
                self._place(chunk, response, via_shm, grouped, buffer, bases)
            # gather first, then widen bf16: the gather moves half the bytes
            return {name: torch.from_numpy(self._decoded(name, grouped[name].take(r.index, axis=0))
                                           .reshape(*r.shape, -1)) for name, r in routes.items()}
        finally:
            if buffer is not None:
                self.replies.release(buffer)

    def _with_ngrams(self, name: str, route: _Route, fingerprints) -> _Route:
        """The route with the N-grams of its lookups summarised per distinct id."""
        rate = self.table(name).collision_sample_rate
        if not rate:
            return route
        fingerprints = np.asarray(fingerprints)
        if fingerprints.shape != route.shape or fingerprints.dtype != np.uint64:
            raise InvalidArgument(f"table {name!r}: ngrams must be uint64 shaped like the ids "
                                  f"{route.shape}, got {fingerprints.dtype} {fingerprints.shape}")
        batch = collisions.summarize(route.grouped, route.index, fingerprints,
                                     collisions.sample_threshold(rate))
        return dataclasses.replace(route, ngrams=batch)

    def _grouped_view(self, name: str, buffer, base: int, num: int) -> np.ndarray:
        """Where a table's distinct rows land: (u, width) in the table's wire dtype."""
        cfg = self.table(name)
        dtype = np.float32 if cfg.dtype == "float32" else np.uint16
        if buffer is None:
            return np.empty((num, cfg.width), dtype)
        return buffer.view(base, num * self._row_bytes(name)).view(dtype).reshape(num, cfg.width)

    def _decoded(self, name: str, rows: np.ndarray) -> np.ndarray:
        return rows if self.table(name).dtype == "float32" else wire.bfloat16_bits_to_float32(rows)

    def _place(self, chunk, response, via_shm: bool, grouped, buffer, bases) -> None:
        """Copy rows that came in the response into their slice of the layout (shared-memory
        replies are already there)."""
        if via_shm:
            return
        for (name, start, stop), rows in zip(chunk, response.tables):
            cfg = self.table(name)
            expected = (stop - start) * self._row_bytes(name)
            if len(rows.rows) != expected:
                raise InvalidArgument(f"table {name!r}: shard replied {len(rows.rows)} bytes, expected {expected}")
            grouped[name][start:stop] = np.frombuffer(rows.rows, grouped[name].dtype).reshape(-1, cfg.width)

    def _send_fetch(self, routes, shard: int, chunk, buffer, bases):
        use_shm = buffer is not None and self.same_host[shard]
        request = memory_pb2.FetchRequest(tables=[
            memory_pb2.TableIds(table=name, ids=wire.encode_ids(routes[name].grouped[start:stop]),
                                reply_offset=bases[name] + start * self._row_bytes(name) if use_shm else 0,
                                ngrams=self._ngrams_message(routes[name], start, stop))
            for name, start, stop in chunk
        ], shared_memory=memory_pb2.SharedMemoryReply(path=buffer.path) if use_shm else None)
        return self._call(self.stubs[shard].Fetch, request), use_shm

    @staticmethod
    def _ngrams_message(route: _Route, start: int, stop: int):
        return None if route.ngrams is None else wire.encode_ngrams(route.ngrams.slice(start, stop))

    def _fetch_result(self, routes, shard: int, chunk, buffer, bases, sent):
        """(response, whether rows came through shared memory); asks again over gRPC alone if
        the shard cannot open the reply file (it runs on another host)."""
        future, use_shm = sent
        try:
            return future.result(), use_shm
        except grpc.RpcError as err:
            if not use_shm or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                _raise(err)
        self.same_host[shard] = False
        future, _ = self._send_fetch(routes, shard, chunk, None, bases)
        return self._result(future), False

    def _row_bytes(self, name: str) -> int:
        cfg = self.table(name)
        return cfg.width * wire.ITEMSIZE[cfg.dtype]

    def fetch_async(self, ids: dict[str, np.ndarray | torch.Tensor]) -> Future:
        """`fetch` in the background: a Future of its result, so callers can prefetch."""
        return self.pool.submit(self.fetch, ids)

    def push(self, grads: dict[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
             step: int, lr: float | None = None) -> int:
        """Apply gradients {table: (ids (n,), grads (n, width))} as table step `step` with learning
        rate `lr` (None: each table's configured lr) on the shards (duplicate ids summed here
        first). Every shard hears of every step, with an empty push if none of its rows has a
        gradient: an adam table catches rows up over steps, and needs each step's lr. Returns
        rows updated."""
        routes, summed = {}, {}
        for name, (table_ids, table_grads) in grads.items():
            routes[name] = route = self._route(name, table_ids)
            g = torch.as_tensor(table_grads, dtype=torch.float32).reshape(len(route.index), -1)  # (n, width)
            summed[name] = torch.zeros(len(route.grouped), g.shape[1]).index_add_(
                0, torch.from_numpy(route.index), g).numpy()  # (u, width), grouped by shard
        requests = self._requests(routes)
        silent = set(range(self.num_shards)) - {shard for shard, _ in requests}
        requests += [(shard, [(name, 0, 0) for name in routes]) for shard in sorted(silent)]
        futures = []
        for shard, chunk in requests:
            request = memory_pb2.PushRequest(client_id=self.client_id, tables=[
                self._grads_message(name, step, lr, routes[name].grouped[start:stop],
                                    summed[name][start:stop])
                for name, start, stop in chunk])
            futures.append(self._call(self.stubs[shard].Push, request))
        return sum(self._result(f).rows_updated for f in futures)

    def _grads_message(self, name: str, step: int, lr: float | None, ids: np.ndarray, grads: np.ndarray):
        cfg = self.table(name)
        if grads.shape[1] != cfg.width:
            raise InvalidArgument(f"table {name!r}: gradient width {grads.shape[1]} != table width {cfg.width}")
        return memory_pb2.TableGrads(table=name, step=step, dtype=wire.dtype_to_proto(cfg.dtype), width=cfg.width,
                                     ids=wire.encode_ids(ids), grads=wire.encode_rows(grads, cfg.dtype),
                                     lr=lr or 0.0)

    # -- plumbing -------------------------------------------------------------------------------
    def _route(self, name: str, ids) -> _Route:
        """Dedup and group by shard, after checking the ids here: a push spans shards, and one
        shard rejecting its part after another applied its own would leave the table half-updated."""
        arr = _as_ids(ids)
        num_rows = self.table(name).num_rows
        bad = arr[(arr < 0) | (arr >= num_rows)]
        if bad.size:
            raise InvalidArgument(f"table {name!r}: row id {int(bad[0])} out of range [0, {num_rows})")
        # One sort groups by shard and dedups: key = shard * per_shard + id // N is a bijection
        # on [0, num_rows) that orders ids by (shard, id) and stays below num_rows + N.
        n = self.num_shards
        per_shard = -(-num_rows // n)
        flat = arr.reshape(-1)
        keys, index = np.unique((flat % n) * per_shard + flat // n, return_inverse=True)  # (u,), (n,)
        grouped = (keys % per_shard) * n + keys // per_shard
        bounds = np.searchsorted(keys, np.arange(n + 1) * per_shard)
        return _Route(grouped, index.reshape(-1), arr.shape, bounds)

    def _requests(self, routes: dict[str, _Route]) -> list[tuple[int, list[tuple[str, int, int]]]]:
        """Per shard, requests [(table, start, stop)] of at most max_rows_per_request rows and
        at most wire.MAX_BATCH_ROWS * MAX_BATCH_WIDTH fp32 values of payload."""
        max_bytes = wire.MAX_BATCH_ROWS * wire.MAX_BATCH_WIDTH * 4
        out = []
        for shard in range(self.num_shards):
            chunk, rows, size = [], 0, 0
            for name, route in routes.items():
                row_bytes = self._row_bytes(name) + 8
                step = max(1, min(self.max_rows_per_request, max_bytes // row_bytes))
                for start in range(int(route.bounds[shard]), int(route.bounds[shard + 1]), step):
                    stop = min(start + step, int(route.bounds[shard + 1]))
                    if chunk and (rows + stop - start > self.max_rows_per_request
                                  or size + (stop - start) * row_bytes > max_bytes):
                        out.append((shard, chunk))
                        chunk, rows, size = [], 0, 0
                    chunk.append((name, start, stop))
                    rows, size = rows + stop - start, size + (stop - start) * row_bytes
            if chunk:
                out.append((shard, chunk))
        return out

    def _call(self, method, request) -> Future:
        """Start a blocking rpc on the client's rpc threads. (grpc's own `.future()` starts a
        thread per call: ~0.4 ms each here, a quarter of a small fetch.)"""
        return self.rpc_pool.submit(method, request, timeout=self.timeout)

    def _result(self, future):
        try:
            return future.result()
        except grpc.RpcError as err:
            _raise(err)

    def _all(self, call) -> list:
        futures = [call(stub) for stub in self.stubs]
        return [self._result(f) for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.rpc_pool.shutdown(wait=False)
        if self.replies is not None:
            self.replies.close()
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
