"""MemoryClient: the trainer's side of the table service.

One fetch or push call covers several tables: ids are deduplicated, routed to their shards
(row r lives on shard r % N), sent as one request per shard (split when larger than
`max_rows_per_request`), concurrently, and the rows reassembled into the caller's order and shape.
"""
from __future__ import annotations

import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from memory_service import wire
from memory_service.config import TableConfig
from memory_service.errors import InvalidArgument, MemoryServiceError, TableExists, TableNotFound
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.sharding import split_by_shard

_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: TableNotFound,
           grpc.StatusCode.ALREADY_EXISTS: TableExists}


@dataclass(frozen=True)
class _Route:
    """Where one table's unique ids went: per shard, positions into the unique ids."""
    unique: np.ndarray  # (u,) int64 sorted
    inverse: np.ndarray  # (n,) caller position -> unique position
    shape: tuple[int, ...]
    positions: list[np.ndarray]  # per shard


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
                 client_id: str | None = None, max_workers: int = 8):
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
        self.tables: dict[str, TableConfig] = {}

    @property
    def num_shards(self) -> int:
        return len(self.stubs)

    # -- tables ---------------------------------------------------------------------------------
    def create_table(self, cfg: TableConfig) -> None:
        """Create `cfg` on every shard (idempotent for an identical config)."""
        request = memory_pb2.CreateTableRequest(config=wire.table_config_to_proto(cfg))
        self._all(lambda stub: stub.CreateTable.future(request, timeout=self.timeout))
        self.tables[cfg.name] = cfg

    def drop_table(self, name: str) -> None:
        request = memory_pb2.DropTableRequest(name=name)
        self._all(lambda stub: stub.DropTable.future(request, timeout=self.timeout))
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
        return self._all(lambda stub: stub.Stats.future(memory_pb2.StatsRequest(), timeout=self.timeout))

    # -- rows -----------------------------------------------------------------------------------
    def fetch(self, ids: dict[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows of several tables: {table: ids (any shape)} -> {table: float32 (*shape, width)}."""
        routes = {name: self._route(name, table_ids) for name, table_ids in ids.items()}
        requests = []  # (shard, [(table, positions)]) chunks
        for shard in range(self.num_shards):
            parts = [(name, r.positions[shard]) for name, r in routes.items() if len(r.positions[shard])]
            requests += [(shard, chunk) for chunk in self._chunks(parts)]
        unique_rows = {name: np.empty((len(r.unique), self.table(name).width), np.float32)
                       for name, r in routes.items()}
        futures = [(chunk, self.stubs[shard].Fetch.future(memory_pb2.FetchRequest(tables=[
            memory_pb2.TableIds(table=name, ids=wire.encode_ids(routes[name].unique[pos])) for name, pos in chunk
        ]), timeout=self.timeout)) for shard, chunk in requests]
        for chunk, future in futures:
            response = self._result(future)
            for (name, pos), rows in zip(chunk, response.tables):
                cfg = self.table(name)
                unique_rows[name][pos] = wire.decode_rows(rows.rows, len(pos), cfg.width, cfg.dtype, name)
        return {name: torch.from_numpy(unique_rows[name][r.inverse].reshape(*r.shape, -1))
                for name, r in routes.items()}

    def fetch_async(self, ids: dict[str, np.ndarray | torch.Tensor]) -> Future:
        """`fetch` in the background: a Future of its result, so callers can prefetch."""
        return self.pool.submit(self.fetch, ids)

    def push(self, grads: dict[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
             step: int) -> int:
        """Apply gradients {table: (ids (n,), grads (n, width))} as table step `step` on the shards
        (duplicate ids summed here first). Returns rows updated."""
        routes, summed = {}, {}
        for name, (table_ids, table_grads) in grads.items():
            routes[name] = route = self._route(name, table_ids)
            g = torch.as_tensor(table_grads, dtype=torch.float32).reshape(len(route.inverse), -1)
            summed[name] = torch.zeros(len(route.unique), g.shape[1]).index_add_(
                0, torch.from_numpy(route.inverse), g).numpy()  # (u, width)
        futures = []
        for shard in range(self.num_shards):
            parts = [(name, r.positions[shard]) for name, r in routes.items() if len(r.positions[shard])]
            for chunk in self._chunks(parts):
                request = memory_pb2.PushRequest(client_id=self.client_id, tables=[
                    self._grads_message(name, step, routes[name].unique[pos], summed[name][pos])
                    for name, pos in chunk])
                futures.append(self.stubs[shard].Push.future(request, timeout=self.timeout))
        return sum(self._result(f).rows_updated for f in futures)

    def _grads_message(self, name: str, step: int, ids: np.ndarray, grads: np.ndarray):
        cfg = self.table(name)
        if grads.shape[1] != cfg.width:
            raise InvalidArgument(f"table {name!r}: gradient width {grads.shape[1]} != table width {cfg.width}")
        return memory_pb2.TableGrads(table=name, step=step, dtype=wire.dtype_to_proto(cfg.dtype), width=cfg.width,
                                     ids=wire.encode_ids(ids), grads=wire.encode_rows(grads, cfg.dtype))

    # -- plumbing -------------------------------------------------------------------------------
    def _route(self, name: str, ids) -> _Route:
        """Dedup and split by shard, after checking the ids here: a push spans shards, and one
        shard rejecting its part after another applied its own would leave the table half-updated."""
        arr = _as_ids(ids)
        num_rows = self.table(name).num_rows
        bad = arr[(arr < 0) | (arr >= num_rows)]
        if bad.size:
            raise InvalidArgument(f"table {name!r}: row id {int(bad[0])} out of range [0, {num_rows})")
        unique, inverse = np.unique(arr.reshape(-1), return_inverse=True)
        return _Route(unique, inverse.reshape(-1), arr.shape, split_by_shard(unique, self.num_shards))

    def _chunks(self, parts: list[tuple[str, np.ndarray]]):
        """Split [(table, positions)] into requests of at most max_rows_per_request rows and at
        most wire.MAX_BATCH_ROWS * MAX_BATCH_WIDTH fp32 values of payload."""
        max_bytes = wire.MAX_BATCH_ROWS * wire.MAX_BATCH_WIDTH * 4
        chunk, rows, size = [], 0, 0
        for name, pos in parts:
            cfg = self.table(name)
            row_bytes = cfg.width * wire.ITEMSIZE[cfg.dtype] + 8
            step = max(1, min(self.max_rows_per_request, max_bytes // row_bytes))
            for start in range(0, len(pos), step):
                piece = pos[start:start + step]
                if chunk and (rows + len(piece) > self.max_rows_per_request
                              or size + len(piece) * row_bytes > max_bytes):
                    yield chunk
                    chunk, rows, size = [], 0, 0
                chunk.append((name, piece))
                rows, size = rows + len(piece), size + len(piece) * row_bytes
        if chunk:
            yield chunk

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
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
