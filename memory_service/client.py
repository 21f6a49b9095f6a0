"""MemoryClient: the trainer's side of the table service.

One fetch or push call covers several tables: ids are deduplicated, routed to their shards
(row r lives on shard r % N), sent as one request per shard (split when larger than
`max_rows_per_request`), concurrently, and the rows reassembled into the caller's order and shape.
A request a shard could not be reached for is re-sent with backoff until the retry deadline
(memory_service/wire/retry.py): a restarted shard serves again on its address, and pushes carry a
request id it applies once.
"""
from __future__ import annotations

import dataclasses
import itertools
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from memory_service.ops import collisions
from memory_service.wire import codec as wire
from memory_service.wire import reply_files as reply_buffer
from memory_service.config import TableConfig
from memory_service.errors import (InvalidArgument, MemoryServiceError, PermissionDenied, RequestTooLarge, RowsMoved,
                                   TableExists, TableNotFound, Unauthenticated)
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.placement.policy import contains
from memory_service.wire.retry import RECONNECT_OPTIONS, RetryPolicy
from memory_service.wire.security import ClientSecurity, open_channel
from memory_service.ops.reports import ClusterReport

_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: TableNotFound,
           grpc.StatusCode.ALREADY_EXISTS: TableExists, grpc.StatusCode.ABORTED: RowsMoved,
           grpc.StatusCode.UNAUTHENTICATED: Unauthenticated, grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
           grpc.StatusCode.RESOURCE_EXHAUSTED: RequestTooLarge}


@dataclass(frozen=True)
class _Route:
    """One table's ids, deduplicated and grouped by shard: `grouped` holds the distinct ids with
    shard 0's first, then shard 1's, ...; `bounds[s]:bounds[s+1]` is shard s's slice of it."""
    grouped: np.ndarray  # (u,) int64 distinct ids, grouped by shard
    index: np.ndarray  # (n,) caller position -> position in `grouped`
    shape: tuple[int, ...]  # the caller's ids shape
    bounds: np.ndarray  # (num_shards + 1,) slice bounds per shard
    ngrams: collisions.NgramBatch | None = None  # the N-grams behind `grouped`'s lookups


@dataclass
class _Fetch:
    """A fetch whose requests are sent: what `_finish_fetch` needs to assemble the replies."""
    routes: dict[str, _Route]
    bases: dict[str, int]  # table -> byte offset of its rows in the reply layout
    buffer: object  # the shared-memory reply buffer, or None
    sent: list  # [(shard, chunk, (future, via_shm))]
    min_step: int
    started: float


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
    """Client of one tables cluster given its shards' gRPC targets in shard order: the cold shards
    (row r's home is cold shard r % N) and, optionally, the hot shards (while row r is hot, its
    home is hot shard r % H). The client learns which rows are hot from the hot shards' maps and
    refreshes them when a shard answers that a row moved (RowsMoved), then re-sends. `timeout`
    bounds each rpc; `retry` how long a shard may stay unreachable (ShardUnavailable after)."""

    def __init__(self, targets: list[str], max_rows_per_request: int = 65536, timeout: float = 60.0,
                 client_id: str | None = None, max_workers: int = 8, shared_memory: bool = True,
                 hot_targets: list[str] = (), retry: RetryPolicy = RetryPolicy(),
                 security: ClientSecurity | None = None):
        if not targets:
            raise ValueError("MemoryClient needs at least one shard target")
        if not 1 <= max_rows_per_request <= wire.MAX_REQUEST_ROWS:
            raise ValueError(f"max_rows_per_request {max_rows_per_request} must be in [1, {wire.MAX_REQUEST_ROWS}] "
                             f"(the shards' per-request limit)")
        self.num_cold, self.num_hot = len(targets), len(hot_targets)
        self.targets = list(targets) + list(hot_targets)  # shard index: cold 0..N-1, then hot
        self._hot: dict[str, np.ndarray] = {}  # table -> sorted ids that are hot (any hot shard)
        self.refreshes = 0  # hot-map refreshes after a RowsMoved answer
        # security: TLS and the bearer token of secured shards (None: plain channels, no token)
        self.channels = [open_channel(t, (*wire.MESSAGE_OPTIONS, *RECONNECT_OPTIONS), security)
                         for t in self.targets]
        self.stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in self.channels]
        self.max_rows_per_request = max_rows_per_request
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.retry = retry
        self.retries = 0  # rpcs re-sent because a shard was unavailable
        self._retries_lock = threading.Lock()
        # PushRequest/CommitStepRequest.request_seq, from a random start: a restarted trainer that
        # passes the same client_id must not repeat the ids of its previous life's requests
        self._request_seqs = itertools.count(1 + secrets.randbits(62))
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memory-client")
        # rpcs get threads of their own: a fetch_async on `pool` waits on its rpcs, and a fetch
        # held at a shard for a later step must leave threads for the push that releases it
        self.rpc_pool = ThreadPoolExecutor(max_workers=max(8, 4 * len(self.targets)), thread_name_prefix="memory-rpc")
        # pushes and commits never queue behind fetches: a fetch held for step s waits for the
        # commit of s, so sharing threads with held fetches could starve that commit
        self.push_pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.targets)), thread_name_prefix="memory-push")
        # trace(event, fields) is called as requests leave ("fetch_sent", "push_sent": shard,
        # step) and as fetches end ("fetch_done": seconds): progress bars and ordering tests read it
        self.trace: Callable[[str, dict], None] | None = None
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
        self._all("CreateTable", memory_pb2.CreateTableRequest(config=wire.table_config_to_proto(cfg)))
        self.tables[cfg.name] = cfg

    def drop_table(self, name: str) -> None:
        self._all("DropTable", memory_pb2.DropTableRequest(name=name))
        self.tables.pop(name, None)

    def table(self, name: str) -> TableConfig:
        """The table's config, asked of shard 0 once and cached."""
        if name not in self.tables:
            try:
                info = self._rpc(0, "DescribeTable", memory_pb2.DescribeTableRequest(name=name))
            except grpc.RpcError as err:
                _raise(err)
            self.tables[name] = wire.table_config_from_proto(info.config)
        return self.tables[name]

    def stats(self) -> list:
        """One StatsResponse per shard, in shard order."""
        return self._all("Stats", memory_pb2.StatsRequest())

    def report(self) -> ClusterReport:
        """Every shard's utilization and what they add up to (what `engram stats` prints)."""
        return ClusterReport(tuple(wire.shard_report_from_proto(r) for r in self.stats()))

    def samples_collisions(self, name: str) -> bool:
        """Whether fetches of table `name` should carry N-gram fingerprints (its
        collision_sample_rate > 0); callers skip computing them otherwise."""
        return self.table(name).collision_sample_rate > 0

    # -- rows -----------------------------------------------------------------------------------
    def fetch(self, ids: dict[str, np.ndarray | torch.Tensor], min_step: int = 0,
              ngrams: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        """Rows of several tables: {table: ids (any shape)} -> {table: float32 (*shape, width)},
        as of table step `min_step` or later (shards hold the request until pushes got there).

        `ngrams`: {table: uint64 fingerprints shaped like its ids} of the N-grams behind the
        lookups (trainer.fingerprint), sent along for the tables' collision stats; ignored for
        tables with collision stats off (see `samples_collisions`)."""
        return self._finish_fetch(self._start_fetch(ids, min_step, ngrams))

    def fetch_async(self, ids: dict[str, np.ndarray | torch.Tensor], min_step: int = 0,
                    ngrams: dict[str, np.ndarray] | None = None) -> Future:
        """`fetch` with the requests sent before it returns (routing runs in the caller's thread)
        and the replies gathered in the background: a Future of the rows, for prefetching."""
        return self.pool.submit(self._finish_fetch, self._start_fetch(ids, min_step, ngrams))

    def announce(self, ids: dict[str, np.ndarray | torch.Tensor], step: int | None = None) -> Future:
        """Tell the rows' homes that a later fetch will read {table: ids (any shape)}, so
        placement can keep those rows or bring them in first (a hint: nothing is read). `step`:
        the min_step that fetch will carry, which lets placement put together the parts of one
        step the shards got and order the steps (announce with it whenever fetches wait for
        steps); None: read after what was announced before. Returns at once; the Future ends when
        every shard answered (raising what a shard refused)."""
        if step is not None and step < 0:
            raise ValueError(f"announced step {step} must be >= 0")
        routes = {name: self._route(name, table_ids) for name, table_ids in ids.items()}
        futures = [self._call(shard, "Announce", memory_pb2.AnnounceRequest(step=step, tables=[
            memory_pb2.TableIds(table=name, ids=wire.encode_ids(routes[name].grouped[start:stop]))
            for name, start, stop in chunk])) for shard, chunk in self._requests(routes)]
        return self.pool.submit(lambda: [self._result(f) for f in futures] and None)

    # -- hot shards -----------------------------------------------------------------------------
    def hot_ids(self, name: str) -> np.ndarray:
        """Sorted ids of table `name` that are hot, as this client last heard."""
        if self.num_hot and name not in self._hot:
            self._load_hot(name)
        return self._hot.get(name, np.empty(0, np.int64))

    def _load_hot(self, *names: str) -> None:
        """Reloads the hot maps of `names` from every hot shard, all requests in flight at once
        (a refresh after a migration round names most tables: one round trip, not one a table)."""
        hot = range(self.num_cold, self.num_shards)
        sent = {name: [self._call(shard, "HotMap", memory_pb2.HotMapRequest(table=name)) for shard in hot]
                for name in names}
        for name, futures in sent.items():
            maps = [self._result(f) for f in futures]
            self._hot[name] = np.sort(np.concatenate([wire.decode_ids(m.ids, name) for m in maps]))

    def _refresh_hot(self, names) -> None:
        self.refreshes += 1
        if self.num_hot:
            self._load_hot(*names)

    def _start_fetch(self, ids, min_step: int, ngrams=None) -> "_Fetch":
        """Route the ids and send one request per shard (chunked); nothing waits here."""
        start_time = time.perf_counter()
        routes = {name: self._route(name, table_ids) for name, table_ids in ids.items()}
        for name, fingerprints in (ngrams or {}).items():
            if name not in routes:
                raise InvalidArgument(f"ngrams given for table {name!r}, which this fetch does not read")
            routes[name] = self._with_ngrams(name, routes[name], fingerprints)
        return self._send_routes(routes, min_step, start_time)

    def _send_routes(self, routes: dict[str, _Route], min_step: int, start_time: float) -> "_Fetch":
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
            sent = [(shard, chunk, self._send_fetch(routes, shard, chunk, buffer, bases, min_step))
                    for shard, chunk in requests]
        except BaseException:
            if buffer is not None:
                self.replies.release(buffer)
            raise
        return _Fetch(routes, bases, buffer, sent, min_step, start_time)

    def _finish_fetch(self, fetch: "_Fetch") -> dict[str, torch.Tensor]:
        """Wait for a started fetch's replies and assemble the rows in the caller's order."""
        try:
            grouped = self._gather(fetch)
            # gather first, then widen bf16: the gather moves half the bytes
            out = {name: torch.from_numpy(self._decoded(name, grouped[name].take(r.index, axis=0))
                                          .reshape(*r.shape, -1)) for name, r in fetch.routes.items()}
            if self.trace is not None:
                self.trace("fetch_done", {"step": fetch.min_step, "seconds": time.perf_counter() - fetch.started})
            return out
        finally:
            if fetch.buffer is not None:
                self.replies.release(fetch.buffer)

    def _gather(self, fetch: "_Fetch") -> dict[str, np.ndarray]:
        """Every table's distinct rows of a started fetch, (u, width) in the wire dtype. The
        requests shards refused because rows moved under them (hot/cold migration) are sent
        again, alone, to the rows' new homes after a refresh of those tables' hot maps, until
        the client's timeout: re-sending the whole fetch made every shard serve it again, and a
        migration round refused most fetches of a step several times."""
        deadline, backoff = time.monotonic() + self.timeout, 0.001
        grouped, moved = self._gather_once(fetch)
        while moved:
            if time.monotonic() > deadline:
                raise RowsMoved(f"rows of tables {sorted(moved)} kept moving for {self.timeout} s")
            time.sleep(backoff)
            backoff = min(2 * backoff, 0.05)
            self._refresh_hot(moved)
            again, origin = self._resend(fetch, moved)
            try:
                rows, moved_again = self._gather_once(again)
                for name, positions in origin.items():
                    done = np.ones(len(positions), bool)
                    done[moved_again.get(name, [])] = False
                    grouped[name][positions[done]] = rows[name][done]
            finally:
                if again.buffer is not None:
                    self.replies.release(again.buffer)
            moved = {name: origin[name][p] for name, p in moved_again.items()}
        return grouped

    def _gather_once(self, fetch: "_Fetch") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The replies of a started fetch placed in its layout, and {table: positions in its
        route's distinct ids} of the requests refused because rows moved."""
        routes, bases, buffer = fetch.routes, fetch.bases, fetch.buffer
        grouped = {name: self._grouped_view(name, buffer, bases[name], len(r.grouped)) for name, r in routes.items()}
        moved: dict[str, list[np.ndarray]] = {}
        for shard, chunk, future in fetch.sent:
            try:
                response, via_shm = self._fetch_result(routes, shard, chunk, buffer, bases, future, fetch.min_step)
            except RowsMoved:
                for name, start, stop in chunk:
                    moved.setdefault(name, []).append(np.arange(start, stop))
                continue
            self._place(chunk, response, via_shm, grouped, buffer, bases)
        return grouped, {name: np.concatenate(parts) for name, parts in moved.items()}

    def _resend(self, fetch: "_Fetch", moved: dict[str, np.ndarray]) -> tuple["_Fetch", dict[str, np.ndarray]]:
        """Sends the rows at `moved` {table: positions in `fetch`'s distinct ids} again, routed
        by the current hot maps, with their N-grams; returns the new fetch and, per table, the
        position in `fetch` of each of its distinct ids."""
        routes, origin = {}, {}
        for name, positions in moved.items():
            old = fetch.routes[name]
            route = self._route(name, old.grouped[positions])  # distinct ids: index is a permutation
            source = np.empty_like(route.index)
            source[route.index] = positions  # new grouped position -> position in `fetch`
            if old.ngrams is not None:
                route = dataclasses.replace(route, ngrams=old.ngrams.take(source))
            routes[name], origin[name] = route, source
        return self._send_routes(routes, fetch.min_step, fetch.started), origin

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

    def _send_fetch(self, routes, shard: int, chunk, buffer, bases, min_step: int):
        use_shm = buffer is not None and self.same_host[shard]
        request = memory_pb2.FetchRequest(tables=[
            memory_pb2.TableIds(table=name, ids=wire.encode_ids(routes[name].grouped[start:stop]),
                                reply_offset=bases[name] + start * self._row_bytes(name) if use_shm else 0,
                                ngrams=self._ngrams_message(routes[name], start, stop))
            for name, start, stop in chunk
        ], shared_memory=memory_pb2.SharedMemoryReply(path=buffer.path) if use_shm else None, min_step=min_step)
        if self.trace is not None:
            self.trace("fetch_sent", {"shard": shard, "step": min_step})
        return self._call(shard, "Fetch", request), use_shm

    @staticmethod
    def _ngrams_message(route: _Route, start: int, stop: int):
        return None if route.ngrams is None else wire.encode_ngrams(route.ngrams.slice(start, stop))

    def _fetch_result(self, routes, shard: int, chunk, buffer, bases, sent, min_step: int):
        """(response, whether rows came through shared memory); asks again over gRPC alone if
        the shard cannot open the reply file (it runs on another host)."""
        future, use_shm = sent
        try:
            return future.result(), use_shm
        except grpc.RpcError as err:
            if not use_shm or err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                _raise(err)
        self.same_host[shard] = False
        future, _ = self._send_fetch(routes, shard, chunk, None, bases, min_step)
        return self._result(future), False

    def _row_bytes(self, name: str) -> int:
        cfg = self.table(name)
        return cfg.width * wire.ITEMSIZE[cfg.dtype]

    def push(self, grads: dict[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
             step: int, lr: float | None = None, contributors: int = 1) -> int:
        """Apply gradients {table: (ids (n,), grads (n, width))} as table step `step` with learning
        rate `lr` (None: each table's configured lr) on the shards (duplicate ids summed here
        first). Requests refused because rows moved (hot/cold shards) are re-sent to the rows' new
        homes; then every shard gets the step's commit (an adam table catches rows up over steps
        and needs each step's lr), and reads see the step from then on. With
        `contributors` K > 1 this is one of K data-parallel workers' parts of the step: the shards
        apply the sum of the K parts once. Returns rows updated (0 for a part that did not
        complete its step)."""
        routes, summed = {}, {}
        for name, (table_ids, table_grads) in grads.items():
            routes[name] = route = self._route(name, table_ids)
            g = torch.as_tensor(table_grads, dtype=torch.float32).reshape(len(route.index), -1)  # (n, width)
            summed[name] = torch.zeros(len(route.grouped), g.shape[1]).index_add_(
                0, torch.from_numpy(route.index), g).numpy()  # (u, width), grouped by shard
        requests = self._requests(routes)
        names = list(routes)
        deadline, backoff, updated = time.monotonic() + self.timeout, 0.001, 0
        while True:
            futures = []
            for shard, chunk in requests:
                request = memory_pb2.PushRequest(client_id=self.client_id, contributors=contributors,
                                                 commit_later=True, request_seq=next(self._request_seqs), tables=[
                    self._grads_message(name, step, lr, routes[name].grouped[start:stop],
                                        summed[name][start:stop])
                    for name, start, stop in chunk])
                if self.trace is not None:
                    self.trace("push_sent", {"shard": shard, "step": step})
                futures.append((chunk, self._call(shard, "Push", request, self.push_pool)))
            moved = {}  # table -> [(ids, grads)] of requests refused because rows moved
            for chunk, future in futures:
                try:
                    updated += self._result(future).rows_updated
                except RowsMoved:
                    if time.monotonic() > deadline:
                        raise
                    for name, start, stop in chunk:
                        moved.setdefault(name, []).append((routes[name].grouped[start:stop], summed[name][start:stop]))
            if not moved:
                return updated + self._commit(names, step, lr, contributors)
            # Re-send only the refused requests' rows, to their homes now: the others applied.
            time.sleep(backoff)
            backoff = min(2 * backoff, 0.05)
            self._refresh_hot(moved)
            routes, summed = {}, {}
            for name, parts in moved.items():  # distinct ids, their summed gradients
                routes[name] = route = self._route(name, np.concatenate([ids for ids, _ in parts]))
                summed[name] = np.empty((len(route.grouped), self.table(name).width), np.float32)
                summed[name][route.index] = np.concatenate([g for _, g in parts])
            requests = [r for r in self._requests(routes) if any(stop > start for _, start, stop in r[1])]

    def _commit(self, names: list[str], step: int, lr: float | None, contributors: int) -> int:
        """Tells every shard that step `step` of the tables is complete (all requests landed)."""
        request = memory_pb2.CommitStepRequest(
            client_id=self.client_id, contributors=contributors, request_seq=next(self._request_seqs),
            tables=[memory_pb2.TableStep(table=name, step=step, lr=lr or 0.0) for name in names])
        return sum(r.rows_updated for r in self._all("CommitStep", request, pool=self.push_pool))

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
        flat = arr.reshape(-1)
        hot = self.hot_ids(name) if self.num_hot else None
        if hot is not None and len(hot):
            return self._route_hot(flat, arr.shape, hot)
        # One sort groups by shard and dedups: key = shard * per_shard + id // N is a bijection
        # on [0, num_rows) that orders ids by (shard, id) and stays below num_rows + N.
        n = self.num_cold
        per_shard = -(-num_rows // n)
        keys, index = np.unique((flat % n) * per_shard + flat // n, return_inverse=True)  # (u,), (n,)
        grouped = (keys % per_shard) * n + keys // per_shard
        bounds = np.searchsorted(keys, np.arange(n + 1) * per_shard)
        bounds = np.concatenate([bounds, np.full(self.num_hot, bounds[-1])])  # no ids for hot shards
        return _Route(grouped, index.reshape(-1), arr.shape, bounds)

    def _route_hot(self, flat: np.ndarray, shape: tuple, hot: np.ndarray) -> _Route:
        """`_route` when some rows are hot: hot ids go to hot shard id % H (index N + id % H)."""
        distinct, first, index = np.unique(flat, return_index=True, return_inverse=True)  # (u,) x2, (n,)
        shard = np.where(contains(hot, distinct), self.num_cold + distinct % self.num_hot,
                         distinct % self.num_cold)  # (u,)
        order = np.argsort(shard, kind="stable")  # by shard, then id
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        bounds = np.searchsorted(shard[order], np.arange(self.num_shards + 1))
        return _Route(distinct[order], rank[index.reshape(-1)], shape, bounds)

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

    def _call(self, shard: int, rpc: str, request, pool: ThreadPoolExecutor | None = None) -> Future:
        """Start rpc `rpc` to `shard` on the client's rpc threads (or `pool`). (grpc's own
        `.future()` starts a thread per call: ~0.4 ms each here, a quarter of a small fetch.)"""
        return (pool or self.rpc_pool).submit(self._rpc, shard, rpc, request)

    def _rpc(self, shard: int, rpc: str, request):
        """rpc `rpc` to `shard`, re-sent while the shard is unavailable (see memory_service/wire/retry.py)."""
        method = getattr(self.stubs[shard], rpc)
        return self.retry.call(lambda: method(request, timeout=self.timeout),
                               f"{rpc} to {self._shard_name(shard)}", self._count_retry)

    def _shard_name(self, shard: int) -> str:
        kind, index = ("cold", shard) if shard < self.num_cold else ("hot", shard - self.num_cold)
        return f"{kind} shard {index} at {self.targets[shard]}"

    def _count_retry(self) -> None:
        with self._retries_lock:
            self.retries += 1

    def _result(self, future):
        try:
            return future.result()
        except grpc.RpcError as err:
            _raise(err)

    def _all(self, rpc: str, request, shards=None, pool: ThreadPoolExecutor | None = None) -> list:
        """rpc `rpc` with `request` to every shard (or `shards`), concurrently on the rpc threads
        (or `pool`); replies in order."""
        futures = [self._call(shard, rpc, request, pool)
                   for shard in (range(self.num_shards) if shards is None else shards)]
        return [self._result(f) for f in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.rpc_pool.shutdown(wait=False)
        self.push_pool.shutdown(wait=False)
        if self.replies is not None:
            self.replies.close()
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
