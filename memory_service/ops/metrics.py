"""Request rates and latencies of one shard, and its Prometheus endpoint.

`ShardMetrics` records every Fetch and Push the servicer handles: a window of the last 60 s in
one-second buckets (requests/s, rows/s, p50/p99 for the Stats rpc and `engram stats`) and
cumulative latency histograms (for Prometheus, which computes its own rates and quantiles).

Prometheus: each shard serves the text format with `prometheus_client` on a port of its own
(`serve_metrics`), not through `ray.util.metrics`. Ray's route would prefix every name with
`ray_`, serve all actors of a node from one per-node endpoint and publish a value only after the
metrics agent's export interval (seconds), and it needs Ray's metrics agent on every node. A port
per shard costs one more declared container port, and gives conventional names (`engram_*`,
base units, `_total` counters), labels that say which shard and table a series belongs to, and a
scrape that reflects the shard's state at that instant: metrics are read from the shard when
scraped (a custom collector), so nothing is counted twice. `METRICS` lists every family; the
table in deploy/README.md is this list.
"""
from __future__ import annotations

import bisect
import hashlib
import hmac
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.utils import floatToGoString

from memory_service.ops.reports import RPCS, RpcWindow, ShardReport
from memory_service.config import namespace_of

# Every table series says which table and what it is: its namespace (the name up to the first
# "/") and the model labels the trainer sets (TableConfig.labels; "" where a table has none), so
# PromQL can sum by layer, order or head without a join.
MODEL_LABELS = ("layer", "order", "head")
TABLE_LABELS = ("table", "namespace", *MODEL_LABELS)

# Latency bucket upper bounds: 25 us .. 26 s, 2^(1/2) apart, so a quantile read from the buckets
# is within ~20% (geometric interpolation inside a bucket).
LATENCY_BUCKETS: tuple[float, ...] = tuple(25e-6 * 2 ** (k / 2) for k in range(41))
WINDOW_S = 60


def quantile(counts: list[int], q: float) -> float:
    """The q-quantile of latencies counted per LATENCY_BUCKETS bucket (the last count is the
    overflow bucket), interpolated geometrically inside its bucket; 0 without observations."""
    total = sum(counts)
    if not total:
        return 0.0
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]  # beyond the last bound: report the bound
            hi = LATENCY_BUCKETS[i]
            lo = LATENCY_BUCKETS[i - 1] if i else hi / math.sqrt(2)
            return lo * (hi / lo) ** ((rank - seen) / n)
        seen += n
    return LATENCY_BUCKETS[-1]


class _RpcRecord:
    """Per-second buckets of the last `window_s` seconds, plus cumulative totals, for one rpc."""

    def __init__(self, window_s: int) -> None:
        self.window_s = window_s
        nb = len(LATENCY_BUCKETS) + 1
        self.second = [-1] * window_s  # the second each ring slot holds
        self.requests = [0] * window_s
        self.rows = [0] * window_s
        self.errors = [0] * window_s
        self.latency = [[0] * nb for _ in range(window_s)]  # (window_s, buckets + 1)
        self.cumulative = [0] * nb  # all-time latency counts per bucket
        self.seconds_sum = 0.0
        self.errors_total = 0

    def _slot(self, second: int) -> int:
        i = second % self.window_s
        if self.second[i] != second:  # a slot last written a full window ago: reuse it
            self.second[i] = second
            self.requests[i] = self.rows[i] = self.errors[i] = 0
            self.latency[i] = [0] * len(self.cumulative)
        return i

    def add(self, second: int, seconds: float, rows: int) -> None:
        i, b = self._slot(second), bisect.bisect_left(LATENCY_BUCKETS, seconds)
        self.requests[i] += 1
        self.rows[i] += rows
        self.latency[i][b] += 1
        self.cumulative[b] += 1
        self.seconds_sum += seconds

    def add_error(self, second: int) -> None:
        self.errors[self._slot(second)] += 1
        self.errors_total += 1

    def window(self, second: int, window_s: float) -> RpcWindow:
        live = [i for i, s in enumerate(self.second) if second - self.window_s < s <= second]
        counts = [sum(self.latency[i][b] for i in live) for b in range(len(self.cumulative))]
        return RpcWindow(requests=sum(self.requests[i] for i in live),
                         rows=sum(self.rows[i] for i in live),
                         errors=sum(self.errors[i] for i in live), window_s=window_s,
                         p50_s=quantile(counts, 0.50), p99_s=quantile(counts, 0.99))


class ShardMetrics:
    """Latencies and rows of the rpcs a shard served. Thread-safe (gRPC's thread pool calls it)."""

    def __init__(self, window_s: int = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s < 1:
            raise ValueError(f"window_s {window_s} must be >= 1")
        self.window_s = window_s
        self.clock = clock
        self.started = clock()
        self._records = {rpc: _RpcRecord(window_s) for rpc in RPCS}
        self._lock = threading.Lock()

    @property
    def uptime_s(self) -> float:
        return self.clock() - self.started

    def observe(self, rpc: str, seconds: float, rows: int) -> None:
        """One served call of `rpc` that took `seconds` and carried `rows` row ids."""
        with self._lock:
            self._records[rpc].add(int(self.clock()), seconds, rows)

    def observe_error(self, rpc: str) -> None:
        with self._lock:
            self._records[rpc].add_error(int(self.clock()))

    def window(self, rpc: str) -> RpcWindow:
        """`rpc` over the last `window_s` seconds (or since start, if younger)."""
        with self._lock:
            now = self.clock()
            return self._records[rpc].window(int(now), min(self.window_s, now - self.started))

    def errors_total(self, rpc: str) -> int:
        """Calls of `rpc` that ended in an error status since start."""
        with self._lock:
            return self._records[rpc].errors_total

    def histogram(self, rpc: str) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (le, count) buckets ending with +Inf, and the sum of seconds: Prometheus's
        histogram since start."""
        with self._lock:
            record = self._records[rpc]
            counts, total = list(record.cumulative), record.seconds_sum
        buckets, running = [], 0
        for le, n in zip([*map(floatToGoString, LATENCY_BUCKETS), "+Inf"], counts):
            running += n
            buckets.append((le, running))
        return buckets, total


# Every metric family a shard exports: name (without `_total` for counters), type, the labels
# beyond `cluster` and `shard`, help. deploy/README.md documents the same list.
METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("engram_shard_info", "gauge", ("num_shards",), "Always 1; labels identify the shard."),
    ("engram_shard_uptime_seconds", "gauge", (), "Seconds since the shard started."),
    ("engram_shard_wal_replayed_records", "gauge", (),
     "Write-ahead log records replayed when the shard's process opened it (> 0: it recovered after a crash)."),
    ("engram_rpc_requests", "counter", ("rpc",), "Fetch and Push calls served."),
    ("engram_rpc_rows", "counter", ("rpc",), "Row ids carried by served calls (repeats counted)."),
    ("engram_rpc_errors", "counter", ("rpc",), "Calls that ended in an error status."),
    ("engram_rpc_duration_seconds", "histogram", ("rpc",), "Server-side handling time of a call."),
    ("engram_table_step", "gauge", TABLE_LABELS, "Largest optimizer step pushed to the table."),
    ("engram_table_rows", "gauge", (*TABLE_LABELS, "tier"), "Rows the tier stores for the table."),
    ("engram_table_bytes", "gauge", (*TABLE_LABELS, "tier"),
     "Bytes the tier holds for the table's rows (ids, index, rows; optimizer state apart)."),
    ("engram_table_optimizer_state_bytes", "gauge", TABLE_LABELS, "Bytes of optimizer state."),
    ("engram_table_rows_read", "counter", TABLE_LABELS, "Row ids read by Fetch."),
    ("engram_table_reads", "counter", TABLE_LABELS,
     "Fetch requests (and reported direct reads) that named the table: rows_read / reads is the "
     "distinct rows a read (a training step) takes from the shard."),
    ("engram_table_tier_hits", "counter", (*TABLE_LABELS, "tier"),
     "Row reads served from the tier (the rest were never written: computed from the seed)."),
    ("engram_table_tier_misses", "counter", (*TABLE_LABELS, "tier"),
     "Row reads the tier did not hold (read from the tier below, or computed from the seed)."),
    ("engram_table_tier_promotions", "counter", (*TABLE_LABELS, "tier"), "Rows placement moved into the tier."),
    ("engram_table_tier_demotions", "counter", (*TABLE_LABELS, "tier"), "Rows placement moved out of the tier."),
    ("engram_table_tier_dirty_rows", "gauge", (*TABLE_LABELS, "tier"),
     "Rows the tier holds that are newer than the tier below's copy."),
    ("engram_table_collision_sample_rate", "gauge", TABLE_LABELS,
     "Share of slots sampled for collision stats now."),
    ("engram_table_ngram_lookups", "counter", TABLE_LABELS,
     "Lookups recorded with their N-gram, over slots with a lookup register."),
    ("engram_table_colliding_lookups", "counter", TABLE_LABELS,
     "Of those, lookups of slots holding >= 2 distinct N-grams."),
    ("engram_table_touched_slots", "gauge", TABLE_LABELS, "Slots with a lookup register."),
    ("engram_table_sampled_slots_touched", "gauge", TABLE_LABELS, "Sampled slots looked up."),
    ("engram_table_sampled_distinct_ngrams", "gauge", TABLE_LABELS,
     "Distinct N-grams over the sampled slots."),
    ("engram_table_sampled_max_distinct_ngrams", "gauge", TABLE_LABELS,
     "Most distinct N-grams in one sampled slot."),
)


class ShardCollector:
    """A prometheus_client collector that reads a shard's report at scrape time."""

    def __init__(self, report: Callable[[], ShardReport], metrics: ShardMetrics, cluster: str) -> None:
        self.report = report
        self.metrics = metrics
        self.cluster = cluster

    def collect(self):
        report = self.report()
        base = (self.cluster, report.role, str(report.shard_id))  # shard ids count within a role
        families = {}
        for name, kind, labels, doc in METRICS:
            cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
                   "histogram": HistogramMetricFamily}[kind]
            families[name] = cls(name, doc, labels=("cluster", "role", "shard", *labels))
        families["engram_shard_info"].add_metric([*base, str(report.num_shards)], 1)
        families["engram_shard_uptime_seconds"].add_metric(base, report.uptime_s)
        families["engram_shard_wal_replayed_records"].add_metric(base, report.wal_replayed)
        for rpc in RPCS:
            families["engram_rpc_requests"].add_metric([*base, rpc], getattr(report.counters, f"{rpc}_requests"))
            families["engram_rpc_rows"].add_metric([*base, rpc], getattr(report.counters, f"{rpc}_rows"))
            families["engram_rpc_errors"].add_metric([*base, rpc], self.metrics.errors_total(rpc))
            buckets, total = self.metrics.histogram(rpc)
            families["engram_rpc_duration_seconds"].add_metric([*base, rpc], buckets, total)
        for table in report.tables:
            self._add_table(families, base, table)
        yield from families.values()

    @staticmethod
    def _add_table(families: dict, base: tuple[str, str], table) -> None:
        labels = dict(table.labels)
        key = [*base, table.name, namespace_of(table.name), *(labels.get(k, "") for k in MODEL_LABELS)]
        families["engram_table_step"].add_metric(key, table.step)
        families["engram_table_optimizer_state_bytes"].add_metric(key, table.optimizer_state_bytes)
        families["engram_table_rows_read"].add_metric(key, table.rows_read)
        families["engram_table_reads"].add_metric(key, table.reads)
        for tier in table.tiers:
            families["engram_table_rows"].add_metric([*key, tier.tier], tier.rows)
            families["engram_table_bytes"].add_metric([*key, tier.tier], tier.bytes)
            families["engram_table_tier_hits"].add_metric([*key, tier.tier], tier.hits)
            families["engram_table_tier_misses"].add_metric([*key, tier.tier], tier.misses)
            families["engram_table_tier_promotions"].add_metric([*key, tier.tier], tier.promotions)
            families["engram_table_tier_demotions"].add_metric([*key, tier.tier], tier.demotions)
            families["engram_table_tier_dirty_rows"].add_metric([*key, tier.tier], tier.dirty_rows)
        c = table.collisions
        if c is None:
            return
        for name, value in (("engram_table_collision_sample_rate", c.sample_rate),
                            ("engram_table_ngram_lookups", c.lookups),
                            ("engram_table_colliding_lookups", c.colliding_lookups),
                            ("engram_table_touched_slots", c.tracked_slots),
                            ("engram_table_sampled_slots_touched", c.sampled_slots_touched),
                            ("engram_table_sampled_distinct_ngrams", c.sampled_distinct_ngrams),
                            ("engram_table_sampled_max_distinct_ngrams", c.sampled_max_distinct)):
            families[name].add_metric(key, value)


@dataclass
class MetricsServer:
    """A running Prometheus endpoint: http://host:port/metrics."""

    server: object
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(report: Callable[[], ShardReport], metrics: ShardMetrics, cluster: str,
                  host: str, port: int, token_digest: str | None = None) -> MetricsServer:
    """Serve the shard's metrics on host:port (0: any free port) from a registry of its own (the
    process-wide default registry would mix in Python's process metrics of whatever else runs
    in the actor). With `token_digest` (sha256 hex of a token), a scrape must send 'Authorization: Bearer <token>' (Prometheus:
    `authorization: {credentials: <token>}` in its scrape config); others get 401. Plain HTTP:
    bind `host` to an interface only the scrapers reach (loopback, a private network)."""
    registry = CollectorRegistry()
    registry.register(ShardCollector(report, metrics, cluster))
    app = make_wsgi_app(registry)
    if token_digest is not None:
        app = _bearer_only(app, token_digest)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host.strip("[]"), port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="shard-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread, server.server_port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # scrapes are not worth a log line each
        pass


def _bearer_only(app: Callable, digest: str) -> Callable:
    """`app` behind a bearer-token check (the token's sha256 compared in constant time)."""
    expected = digest.encode()

    def checked(environ, start_response):
        scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        given_digest = hashlib.sha256(given.strip().encode()).hexdigest().encode()
        if scheme.lower() == "bearer" and given and hmac.compare_digest(given_digest, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                            ("WWW-Authenticate", 'Bearer realm="engram metrics"')])
        return [b"a bearer token is required: Authorization: Bearer <token>\n"]
    return checked
