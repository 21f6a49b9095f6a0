"""MemoryClient: the trainer's side of the table service.

One fetch or push call covers several tables: ids are deduplicated, routed to their shards
(row r lives on shard r % N) and cut into requests of at most `max_rows_per_request` rows
(memory_service/router.py), sent concurrently, one or more per shard, in a round
(memory_service/wire/fetch_round.py, push_round.py, over wire/transport.py), and the rows
reassembled into the caller's order and shape. A request a shard
could not be reached for is re-sent with backoff until the retry deadline
(memory_service/wire/retry.py): a restarted shard serves again on its address, and pushes carry a
request id it applies once. Rows a shard refused because they moved (hot/cold migration) are
re-sent to their new homes with the same backoff (`RetryPolicy.resend_moved`).
"""
from __future__ import annotations

import itertools
import secrets
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from memory_service.ops import collisions
from memory_service import quantization
from memory_service.wire import codec, heap, record_rounds, reply_files, small_fetch
from memory_service.config import TableConfig
from memory_service.errors import InvalidArgument, RowsMoved
from memory_service.rpc import memory_pb2
from memory_service.router import Request, Route, Router, as_row_ids
from memory_service.tables import Announcement
from memory_service.wire.direct_reads import DirectReads
from memory_service.wire.fetch_round import FetchRound
from memory_service.wire.push_round import PushRound, Refused, riding_announcements, whole_step_requests
from memory_service.wire.reply_layout import ReplyLayout
from memory_service.wire.retry import RetryPolicy
from memory_service.wire.small_fetch import SmallFetch
from memory_service.wire.security import ClientSecurity
from memory_service.wire.transport import Transport
from memory_service.ops.reports import ClusterReport


def _as_ids(ids) -> np.ndarray:
    """Caller ids (numpy or torch, any shape) as an int64 numpy array."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return as_row_ids(ids)


class MemoryClient:
    """Client of one tables cluster given its shards' gRPC targets in shard order: the cold shards
    (row r's home is cold shard r % N) and, optionally, the hot shards (while row r is hot, its
    home is hot shard r % H). The client learns which rows are hot from the hot shards' maps and
    refreshes them when a shard answers that a row moved (RowsMoved), then re-sends. `timeout`
    bounds each rpc; `retry` how long a shard may stay unreachable (ShardUnavailable after)."""

    def __init__(self, targets: list[str], max_rows_per_request: int = 65536, timeout: float = 60.0,
                 client_id: str | None = None, max_workers: int = 8, shared_memory: bool = True,
                 hot_targets: list[str] = (), retry: RetryPolicy = RetryPolicy(),
                 security: ClientSecurity | None = None, direct_reads: bool = True):
        if not targets:
            raise ValueError("MemoryClient needs at least one shard target")
        if not 1 <= max_rows_per_request <= codec.MAX_REQUEST_ROWS:
            raise ValueError(f"max_rows_per_request {max_rows_per_request} must be in [1, {codec.MAX_REQUEST_ROWS}] "
                             f"(the shards' per-request limit)")
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} must be > 0 (seconds)")
        heap.keep_message_buffers()  # large replies off glibc's mmap-per-message path (wire/heap.py)
        self.num_cold, self.num_hot = len(targets), len(hot_targets)
        self.targets = list(targets) + list(hot_targets)  # shard index: cold 0..N-1, then hot
        self.router = Router(self.num_cold, self.num_hot, max_rows_per_request,
                             max_request_bytes=codec.MAX_REPLY_BYTES)
        self.transport = Transport(self.targets, self.num_cold, timeout, retry, security)
        self.refreshes = 0  # hot-map refreshes after a RowsMoved answer
        self.max_rows_per_request = max_rows_per_request
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.retry = retry
        self.moved_retry = RetryPolicy.for_moved_rows(timeout)  # re-sends after RowsMoved
        # PushRequest/CommitStepRequest.request_seq, from a random start: a restarted trainer that
        # passes the same client_id must not repeat the ids of its previous life's requests
        self._request_seqs = itertools.count(1 + secrets.randbits(62))
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memory-client")
        # trace(event, fields) is called as requests leave ("fetch_sent", "push_sent": shard,
        # step) and as fetches end ("fetch_done": seconds): progress bars and ordering tests read it
        self.trace: Callable[[str, dict], None] | None = None
        self.tables: dict[str, TableConfig] = {}
        # Same-host fast path: rows come back through shared memory until a shard says it cannot
        # open the file (it runs on another host); then that shard's rows come over gRPC.
        self.replies = reply_files.ReplyBufferPool() if shared_memory and reply_files.available() else None
        self.same_host = [True] * len(self.targets)
        # Same-host reads straight from the shards' shared arenas (wire/direct_reads.py), tried
        # before a Fetch; off with shared_memory=False (every row then comes over gRPC)
        self.direct = DirectReads(self.transport) if shared_memory and direct_reads and DirectReads.available() else None

    @property
    def num_shards(self) -> int:
        return self.transport.num_shards

    @property
    def stubs(self) -> list:
        """One gRPC stub per shard, in shard order (cold, then hot)."""
        return self.transport.stubs

    @property
    def retries(self) -> int:
        """rpcs re-sent because a shard was unavailable."""
        return self.transport.retries

    # -- tables ---------------------------------------------------------------------------------
    def create_table(self, cfg: TableConfig) -> None:
        """Create `cfg` on every shard (idempotent for an identical config)."""
        self.transport.call_all("CreateTable", memory_pb2.CreateTableRequest(config=codec.table_config_to_proto(cfg)))
        self.tables[cfg.name] = cfg

    def freeze_table(self, name: str, quantization: str = "none") -> TableConfig:
        """Freeze table `name` in place on every shard, cold and hot (Shard.freeze_table): no more
        pushes, no optimizer state, rows kept bit for bit or, with `quantization` "fp8_e4m3" or
        "int8", stored and sent quantized (fetch still returns float32). Idempotent; a frozen
        table with another quantization is FailedPrecondition. Returns the frozen config. Other
        clients that cached the table's config before the freeze get FailedPrecondition from
        their fetches of it (codec.check_reply_dtype) and must be reopened."""
        replies = self.transport.call_all("FreezeTable", memory_pb2.FreezeTableRequest(table=name,
                                                                                       quantization=quantization))
        self.tables[name] = codec.table_config_from_proto(replies[0].table.config)
        return self.tables[name]

    def drop_table(self, name: str) -> None:
        self.transport.call_all("DropTable", memory_pb2.DropTableRequest(name=name))
        self.tables.pop(name, None)

    def table(self, name: str) -> TableConfig:
        """The table's config, asked of shard 0 once and cached."""
        if name not in self.tables:
            info = self.transport.call(0, "DescribeTable", memory_pb2.DescribeTableRequest(name=name))
            self.tables[name] = codec.table_config_from_proto(info.config)
        return self.tables[name]

    def stats(self) -> list:
        """One StatsResponse per shard, in shard order (counting this client's direct reads)."""
        if self.direct is not None:
            self.direct.flush()
        return self.transport.call_all("Stats", memory_pb2.StatsRequest())

    def report(self) -> ClusterReport:
        """Every shard's utilization and what they add up to (what `engram stats` prints)."""
        return ClusterReport(tuple(codec.shard_report_from_proto(r) for r in self.stats()))

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
        tables with collision stats off (see `samples_collisions`). A decode-sized fetch (as
        many ids of each table, tables of one width) takes the short path of `fetch_stacked_async`
        in this thread."""
        if not ngrams and (stack := self._decode_sized(ids)) is not None:
            names, matrix, shapes = stack
            rows = self._finish_small(self._send_small(names, matrix, min_step), names, time.perf_counter())
            return {name: rows[k].reshape(*shapes[k], -1) for k, name in enumerate(names)}
        return self._finish_fetch(self._start_fetch(ids, min_step, ngrams))

    def _decode_sized(self, ids: dict) -> tuple[list[str], np.ndarray, list[tuple]] | None:
        """(names, ids (K, n), each table's ids' shape) of a fetch the short path takes, or None."""
        if not ids or len({tuple(np.shape(table_ids)) for table_ids in ids.values()}) > 1:
            return None
        names = list(ids)
        if not small_fetch.fits([self.table(name) for name in names], sum(np.size(i) for i in ids.values())):
            return None
        shapes = [tuple(np.shape(ids[name])) for name in names]
        return names, np.stack([_as_ids(ids[name]).reshape(-1) for name in names]), shapes

    def fetch_async(self, ids: dict[str, np.ndarray | torch.Tensor], min_step: int = 0,
                    ngrams: dict[str, np.ndarray] | None = None, packed: bool = False) -> Future:
        """`fetch` with the requests sent before it returns (routing runs in the caller's thread)
        and the replies gathered in the background: a Future of the rows, for prefetching.
        `packed`: a quantized table's rows come as their packed bytes, uint8 (*shape,
        4 * stored_width) (memory_service/quantization.py), for the caller to dequantize where
        it uses them (trainer/remote_tables.py: on the GPU, a quarter of the bytes to copy)."""
        return self.pool.submit(self._finish_fetch, self._start_fetch(ids, min_step, ngrams), packed)

    def fetch_stacked_async(self, names: list[str], ids: np.ndarray | torch.Tensor, min_step: int = 0) -> Future:
        """Rows of several tables of one width: `ids` (K, n), row k of table `names[k]` -> a Future
        of (K, n, width) float32, as of table step `min_step`. The requests leave before it
        returns. A decode-sized fetch (generation: a few ids of each table) takes a short path
        with no per-table routing (wire/small_fetch.py); a larger one, or one refused because
        rows moved, goes the way of `fetch`."""
        ids = _as_ids(ids)
        if ids.ndim != 2 or ids.shape[0] != len(names):
            raise InvalidArgument(f"stacked ids must be (K, n) with K = {len(names)} tables, got {ids.shape}")
        if not small_fetch.fits([self.table(name) for name in names], ids.size):
            return self.pool.submit(self._stacked, names, self._start_fetch(dict(zip(names, ids)), min_step))
        started = time.perf_counter()
        return self.pool.submit(self._finish_small, self._send_small(names, ids, min_step), names, started)

    def _send_small(self, names: list[str], ids: np.ndarray, min_step: int) -> SmallFetch:
        """A SmallFetch of ids (K, n) of tables `names`, its requests sent (or read directly)."""
        for name in names if self.num_hot else ():
            self.hot_ids(name)  # the hot maps loaded (once)
        configs = [self.table(name) for name in names]
        return SmallFetch(self.transport, self.router, configs, ids, min_step, self.trace, self.direct).send()

    def _finish_small(self, small: SmallFetch, names: list[str], started: float) -> torch.Tensor:
        """A SmallFetch's rows (K, n, width); the requests refused because rows moved are sent
        again alone, the way of `fetch`, after a refresh of the hot maps (each row read once)."""
        def refetch(ids: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            self._refresh_hot(list(ids))
            return self._finish_fetch(self._start_fetch(ids, small.min_step))

        rows = torch.from_numpy(small.rows(refetch))
        if self.trace is not None:
            self.trace("fetch_done", {"step": small.min_step, "seconds": time.perf_counter() - started})
        return rows

    def _stacked(self, names: list[str], fetch: FetchRound) -> torch.Tensor:
        rows = self._finish_fetch(fetch)
        return torch.stack([rows[name] for name in names])  # (K, n, width)

    def announce(self, ids: dict[str, np.ndarray | torch.Tensor], step: int | None = None) -> Future:
        """Tell the rows' homes that a later fetch will read {table: ids (any shape)}, so
        placement can keep those rows or bring them in first (a hint: nothing is read). `step`:
        the min_step that fetch will carry, which lets placement put together the parts of one
        step the shards got and order the steps (announce with it whenever fetches wait for
        steps); None: read after what was announced before. Returns at once; the Future ends when
        every shard answered (raising what a shard refused)."""
        futures = self._send_announcements(self._announce_requests(Announcement(ids, step)))
        return self.pool.submit(lambda: [self.transport.result(f) for f in futures] and None)

    def _announce_requests(self, announce: Announcement) -> list[tuple[int, memory_pb2.AnnounceRequest]]:
        """The announcement routed to the ids' homes: [(shard, AnnounceRequest)], in shard order,
        within the wire's limits."""
        if announce.step is not None and announce.step < 0:
            raise ValueError(f"announced step {announce.step} must be >= 0")
        routes = {name: self._route(name, table_ids) for name, table_ids in announce.ids.items()}
        return [(shard, memory_pb2.AnnounceRequest(step=announce.step, tables=[
            memory_pb2.TableIds(table=name, ids=codec.encode_ids(routes[name].grouped[start:stop]))
            for name, start, stop in chunk])) for shard, chunk in self._requests(routes)]

    def _send_announcements(self, requests: list[tuple[int, memory_pb2.AnnounceRequest]]) -> list[Future]:
        """Each (shard, AnnounceRequest) sent as an Announce of its own; nothing waits here."""
        return [self.transport.start(shard, "Announce", request) for shard, request in requests]

    # -- hot shards -----------------------------------------------------------------------------
    def hot_ids(self, name: str) -> np.ndarray:
        """Sorted ids of table `name` that are hot, as this client last heard."""
        if self.num_hot and not self.router.knows_hot(name):
            self._load_hot(name)
        return self.router.hot_ids(name)

    def _load_hot(self, *names: str) -> None:
        """Reloads the hot maps of `names` from every hot shard, all requests in flight at once
        (a refresh after a migration round names most tables: one round trip, not one a table)."""
        hot = range(self.num_cold, self.num_shards)
        sent = {name: [self.transport.start(shard, "HotMap", memory_pb2.HotMapRequest(table=name)) for shard in hot]
                for name in names}
        for name, futures in sent.items():
            maps = [self.transport.result(f) for f in futures]
            self.router.set_hot(name, np.concatenate([codec.decode_ids(m.ids, name) for m in maps]))

    def _refresh_hot(self, names) -> None:
        self.refreshes += 1
        if self.num_hot:
            self._load_hot(*names)

    def _resend_moved(self, refused: dict, resend: Callable[[dict], dict], what: str) -> None:
        """Re-sends what shards refused because rows moved under them (hot/cold migration):
        `resend(refused)` sends {table: refused part} to the rows' homes after a reload of those
        tables' hot maps and returns what was refused again, with `moved_retry`'s backoff until
        its deadline (the client's timeout), then RowsMoved. The fetch and the push path both
        re-send through here."""
        def refresh_and_resend(refused: dict) -> dict:
            self._refresh_hot(refused)
            return resend(refused)

        self.moved_retry.resend_moved(refused, refresh_and_resend, what)

    def _start_fetch(self, ids, min_step: int, ngrams=None) -> FetchRound:
        """Route the ids and send one request per shard (chunked); nothing waits here."""
        start_time = time.perf_counter()
        routes = {name: self._route(name, table_ids) for name, table_ids in ids.items()}
        batches = {}
        for name, fingerprints in (ngrams or {}).items():
            if name not in routes:
                raise InvalidArgument(f"ngrams given for table {name!r}, which this fetch does not read")
            batch = self._ngram_batch(name, routes[name], fingerprints)
            if batch is not None:
                batches[name] = batch
        return self._fetch_round(routes, batches, min_step, start_time)

    def _fetch_round(self, routes: dict[str, Route], ngrams: dict[str, collisions.NgramBatch], min_step: int,
                     started: float) -> FetchRound:
        """A fetch round of `routes` sent, its rows to land in a layout of its own."""
        requests = self._requests(routes)
        layout = ReplyLayout({name: (len(route.grouped), self.table(name)) for name, route in routes.items()},
                             self.replies, any(self.same_host[shard] for shard, _ in requests))
        return FetchRound(self.transport, routes, ngrams, layout, min_step, self.same_host, self.trace,
                          started, self.direct).send(requests)

    def _finish_fetch(self, fetch: FetchRound, packed: bool = False) -> dict[str, torch.Tensor]:
        """Wait for a started fetch's replies and assemble the rows in the caller's order (a
        quantized table's dequantized to float32, or with `packed` its packed bytes)."""
        try:
            grouped = self._gather(fetch)
            for name, cfg in fetch.layout.configs.items():  # packed rows -> float32, before the gather
                if cfg.is_quantized and not packed:
                    grouped[name] = quantization.dequantize(grouped[name], cfg.width, cfg.quantization)
            # bf16 widens during the gather: it moves half the bytes, and one pass writes the output
            out = {name: torch.from_numpy(route.reassemble(grouped[name], fetch.layout.is_bf16(name)))
                   for name, route in fetch.routes.items()}
            for name, cfg in fetch.layout.configs.items():
                if cfg.is_quantized and packed:  # (*shape, stored_width) words -> their bytes
                    out[name] = out[name].view(torch.uint8)
            if self.trace is not None:
                self.trace("fetch_done", {"step": fetch.min_step, "seconds": time.perf_counter() - fetch.started})
            return out
        finally:
            fetch.layout.release()

    def _gather(self, fetch: FetchRound) -> dict[str, np.ndarray]:
        """Every table's distinct rows of a started fetch, (u, width) in the wire dtype. The
        requests shards refused because rows moved under them (hot/cold migration) are sent
        again, alone, to the rows' new homes after a refresh of those tables' hot maps, until
        the client's timeout: re-sending the whole fetch made every shard serve it again, and a
        migration round refused most fetches of a step several times."""
        moved = fetch.gather()
        grouped = fetch.layout.rows

        def resend(moved: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            again, origin = self._resend(fetch, moved)
            try:
                moved_again = again.gather()
                for name, positions in origin.items():
                    done = np.ones(len(positions), bool)
                    done[moved_again.get(name, [])] = False
                    grouped[name][positions[done]] = again.layout.rows[name][done]
            finally:
                again.layout.release()
            return {name: origin[name][p] for name, p in moved_again.items()}

        self._resend_moved(moved, resend, "fetch")
        return grouped

    def _resend(self, fetch: FetchRound, moved: dict[str, np.ndarray]) -> tuple[FetchRound, dict[str, np.ndarray]]:
        """Sends the rows at `moved` {table: positions in `fetch`'s distinct ids} again, routed
        by the current hot maps, with their N-grams; returns the new fetch and, per table, the
        position in `fetch` of each of its distinct ids."""
        routes, ngrams, origin = {}, {}, {}
        for name, positions in moved.items():
            old = fetch.routes[name]
            route = self._route(name, old.grouped[positions])  # distinct ids: index is a permutation
            source = np.empty_like(route.index)
            source[route.index] = positions  # new grouped position -> position in `fetch`
            if name in fetch.ngrams:
                ngrams[name] = fetch.ngrams[name].take(source)
            routes[name], origin[name] = route, source
        return self._fetch_round(routes, ngrams, fetch.min_step, fetch.started), origin

    def _ngram_batch(self, name: str, route: Route, fingerprints) -> collisions.NgramBatch | None:
        """The N-grams of the route's lookups summarised per distinct id (None: the table keeps
        no collision stats)."""
        rate = self.table(name).collision_sample_rate
        if not rate:
            return None
        fingerprints = np.asarray(fingerprints)
        if fingerprints.shape != route.shape or fingerprints.dtype != np.uint64:
            raise InvalidArgument(f"table {name!r}: ngrams must be uint64 shaped like the ids "
                                  f"{route.shape}, got {fingerprints.dtype} {fingerprints.shape}")
        return collisions.summarize(route.grouped, route.index, fingerprints, collisions.sample_threshold(rate))

    def push(self, grads: dict[str, tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
             step: int, lr: float | None = None, contributors: int = 1,
             announce: Announcement | None = None) -> int:
        """Apply gradients {table: (ids (n,), grads (n, width))} as table step `step` with learning
        rate `lr` (None: each table's configured lr) on the shards (duplicate ids summed here
        first). Requests refused because rows moved (hot/cold shards) are re-sent to the rows' new
        homes; then every shard gets the step's commit (an adam table catches rows up over steps
        and needs each step's lr), and reads see the step from then on. The commit rides on the
        push (one request per shard) where rows cannot move (no hot shards), the push is the whole
        step (one contributor) and each shard's part fits one request; otherwise it is a
        CommitStep of its own once every request landed. With `contributors` K > 1 this is one of
        K data-parallel workers' parts of the step: the shards apply the sum of the K parts once.
        `announce`: ids a later fetch reads ({table: ids (any shape)}, that fetch's min_step), for
        placement, riding on each shard's push where it can (as `announce` sends it otherwise).
        Returns rows updated (0 for a part that did not complete its step)."""
        routes, summed = {}, {}
        for name, (table_ids, table_grads) in grads.items():
            routes[name] = route = self._route(name, table_ids)
            g = torch.as_tensor(table_grads, dtype=torch.float32).reshape(len(route.index), -1)  # (n, width)
            summed[name] = torch.zeros(len(route.grouped), g.shape[1]).index_add_(
                0, torch.from_numpy(route.index), g).numpy()  # (u, width), grouped by shard
        requests = self._requests(routes)
        whole = None if self.num_hot or contributors > 1 else whole_step_requests(routes, requests, self.num_shards)
        requests = whole or requests
        riding, alone = riding_announcements([] if announce is None else self._announce_requests(announce), requests)
        announced = self._send_announcements(alone)
        pushed = self._push_round(routes, summed, step, lr, contributors, requests, riding, commit_later=whole is None)
        updated, moved = pushed.gather()
        announced += self._send_announcements(pushed.unannounced)  # refused with their push: alone now

        def resend(moved: Refused) -> Refused:
            nonlocal updated  # only the refused requests' rows, to their homes now: the others applied
            more, moved = self._push_round(*self._reroute(moved), step, lr, contributors).gather()
            updated += more
            return moved

        committed = whole is not None and not moved  # else: after the re-sends, a commit of its own
        self._resend_moved(moved, resend, f"push of step {step}")
        if not committed:
            updated += self._commit(list(routes), step, lr, contributors)
        for future in announced:
            self.transport.result(future)
        return updated

    def _push_round(self, routes: dict[str, Route], summed: dict[str, np.ndarray], step: int, lr: float | None,
                    contributors: int, requests: list[Request] | None = None,
                    announcements: dict[int, memory_pb2.AnnounceRequest] | None = None,
                    commit_later: bool = True) -> PushRound:
        """A push round of `routes` sent (`requests`: the routes cut to the wire's limits unless
        given); `gather` waits for its replies."""
        configs = {name: self.table(name) for name in routes}
        requests = self._requests(routes) if requests is None else requests
        return PushRound(self.transport, self.client_id, self._request_seqs, configs, routes, summed, step, lr,
                         contributors, self.trace, commit_later).send(requests, announcements)

    def _reroute(self, moved: Refused) -> tuple[dict[str, Route], dict[str, np.ndarray]]:
        """Refused rows {table: [(ids, grads)]} routed to their homes now: (routes, their distinct
        ids' gradients (u, width))."""
        routes, summed = {}, {}
        for name, parts in moved.items():  # the refused ids are distinct: route.index is a permutation
            routes[name] = route = self._route(name, np.concatenate([ids for ids, _ in parts]))
            summed[name] = np.empty((len(route.grouped), self.table(name).width), np.float32)
            summed[name][route.index] = np.concatenate([g for _, g in parts])
        return routes, summed

    def _commit(self, names: list[str], step: int, lr: float | None, contributors: int) -> int:
        """Tells every shard that step `step` of the tables is complete (all requests landed)."""
        request = memory_pb2.CommitStepRequest(
            client_id=self.client_id, contributors=contributors, request_seq=next(self._request_seqs),
            tables=[memory_pb2.TableStep(table=name, step=step, **codec.lr_field(lr)) for name in names])
        replies = self.transport.call_all("CommitStep", request, pool=self.transport.push_pool)
        return sum(r.rows_updated for r in replies)

    # -- whole row records: import and export (wire/record_rounds.py) ----------------------------
    def state_width(self, name: str) -> int:
        """Optimizer-state values per row of table `name` (what ReadRecords returns per row)."""
        return self.transport.call(0, "ReadRecords", memory_pb2.ReadRecordsRequest(table=name)).state_width

    def write_records(self, name: str, ids: np.ndarray, rows: np.ndarray, state: np.ndarray | None = None,
                      last: np.ndarray | None = None, log: dict[str, np.ndarray] | None = None) -> int:
        """Sets rows (n, width) float32 of distinct `ids` (n,), with their optimizer state and last
        step or (None) a new row's, after the step log `log` if given (record_rounds.write)."""
        state_width = 0 if state is None else state.shape[1]
        return record_rounds.write(self.transport, self.num_cold, name, _as_ids(ids), rows, state, last,
                                   state_width, log)

    def read_records(self, name: str, ids: np.ndarray, state_width: int | None = None):
        """RowRecords of `ids` (n,) as they stand at the table's step (ReadRecords), never-written
        rows with last step -1 (`state_width`: the table's, asked of shard 0 when None)."""
        state_width = self.state_width(name) if state_width is None else state_width
        return record_rounds.read(self.transport, self.num_cold, name, _as_ids(ids), self.table(name).width,
                                  state_width)

    def step_log(self, name: str) -> dict[str, np.ndarray]:
        """Table `name`'s step log {"step", "steps" (k,) int64, "lrs" (k,) float64}, as shard 0 logged
        it (every shard logs every step)."""
        reply = self.transport.call(0, "ReadRecords", memory_pb2.ReadRecordsRequest(table=name, with_log=True))
        return record_rounds.log_of(reply, name)

    # -- plumbing -------------------------------------------------------------------------------
    def _route(self, name: str, ids) -> Route:
        """Table `name`'s ids (numpy or torch, any shape) checked, deduplicated and grouped by home
        shard (Router.route), the table's hot map loaded first where there are hot shards."""
        arr = _as_ids(ids)
        num_rows = self.table(name).num_rows
        if self.num_hot:
            self.hot_ids(name)
        return self.router.route(name, arr, num_rows)

    def _requests(self, routes: dict[str, Route]) -> list[Request]:
        """Per shard, requests [(table, start, stop)] within the wire's limits (Router.requests)."""
        return self.router.requests(routes, {name: self._row_bytes(name) for name in routes})

    def _row_bytes(self, name: str) -> int:
        return self.table(name).wire_row_bytes

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()  # the shards count the reads they did not serve
        self.pool.shutdown(wait=False)
        self.transport.close()
        if self.replies is not None:
            self.replies.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
