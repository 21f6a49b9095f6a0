"""How loaded each shard is: what one shard reports (`ShardReport`, the Stats rpc) and what a
whole tables cluster adds up to (`ClusterReport`, what `engram stats` prints).

A shard reports its rows, bytes and hits per tier and table, its optimizer-state bytes, and its
Fetch and Push traffic over the last minute (requests/s, rows/s, p50/p99). The cluster view adds
the shards up per table, merges their collision counts, and measures imbalance: max / mean over
the shards of one role of the load (row ids handled in the window, Fetch plus Push) and of the
rows stored. 1.0 is perfect balance; with rows spread by id % num_shards the cold shards' rows stay
near 1.0, while load follows which N-grams are hot. Hot and cold shards are never compared with
each other: a hot shard holds the few rows placement chose, by design unlike a cold one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from memory_service.ops.collisions import CollisionCounts, CollisionSummary
from memory_service.storage.usage import TierUsage

RPCS = ("fetch", "push")
ROLES = ("cold", "hot")  # a shard's role: cold, home of rows id % num_cold; hot, of the rows placement moved there


@dataclass(frozen=True)
class RpcWindow:
    """One rpc over the recent window: calls, rows, errors, window length and latency quantiles."""

    requests: int
    rows: int
    errors: int
    window_s: float
    p50_s: float
    p99_s: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.window_s if self.window_s > 0 else 0.0


@dataclass
class ShardCounters:
    """Requests and row ids served (rows before deduplication), to prove a shard did the work."""

    fetch_requests: int = 0
    fetch_rows: int = 0
    push_requests: int = 0
    push_rows: int = 0

@dataclass(frozen=True)
class TableUsage:
    """One table on one shard."""

    name: str
    num_rows: int  # of the whole table
    width: int
    step: int
    rows_read: int  # ids read by Fetch since start
    optimizer_rows: int
    optimizer_state_bytes: int
    tiers: tuple[TierUsage, ...]
    collisions: CollisionCounts | None = None  # None: collision stats off
    reads: int = 0  # Fetch requests (and reported direct reads) that named the table
    labels: tuple[tuple[str, str], ...] = ()  # TableConfig.labels
    # bytes per row (a frozen or quantized table's are smaller; TableStore.row_bytes): in DRAM
    # (row, optimizer state, id, last step, dirty flag), in LMDB (0 without disk), in a Fetch reply
    dram_row_bytes: int = 0
    disk_row_bytes: int = 0
    wire_row_bytes: int = 0

    @property
    def rows(self) -> int:
        """Rows written: tiers are inclusive, so those of the tier holding most (the cold one)."""
        return max((t.rows for t in self.tiers), default=0)

    @property
    def bytes(self) -> int:
        """Everything held for the table: every tier plus optimizer state."""
        return sum(t.bytes for t in self.tiers) + self.optimizer_state_bytes


@dataclass(frozen=True)
class ShardReport:
    """One shard's utilization: what its Stats rpc returns and its Prometheus endpoint exports."""

    shard_id: int
    num_shards: int
    uptime_s: float
    counters: ShardCounters  # since start
    fetch: RpcWindow  # recent window
    push: RpcWindow
    tables: tuple[TableUsage, ...]  # sorted by name
    metrics_port: int = 0
    role: str = "cold"  # "hot": shard_id / num_shards count the hot shards
    wal_replayed: int = 0  # write-ahead log records replayed when this process opened the shard

    @property
    def label(self) -> str:
        """"cold 0", "hot 1": the shard as operators name it (shard ids count within a role)."""
        return f"{self.role} {self.shard_id}"

    @property
    def load(self) -> int:
        """Row ids handled in the recent window, Fetch and Push together."""
        return self.fetch.rows + self.push.rows

    @property
    def rows(self) -> int:
        """Rows stored over all tables and tiers."""
        return sum(t.rows for t in self.tables)


def imbalance(values: list[float]) -> float | None:
    """max / mean (1.0: balanced); None when every value is 0 (nothing to balance)."""
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else None


@dataclass(frozen=True)
class TableSummary:
    """One table over all shards."""

    name: str
    num_rows: int
    width: int
    step: int  # the largest over shards
    rows: int
    bytes: int
    optimizer_state_bytes: int
    rows_read: int
    tiers: dict[str, TierUsage]  # tier -> rows, bytes, hits summed over shards
    hit_rate: dict[str, float | None]  # tier -> hits / rows_read
    rows_imbalance: float | None
    collisions: CollisionSummary | None
    reads: int = 0  # the most read requests one shard saw (a training step reads each shard once)
    hot_rows_read: int = 0  # of rows_read, those served by hot shards
    dram_row_bytes: int = 0  # bytes a stored row takes in DRAM (the largest over shards)
    wire_row_bytes: int = 0  # bytes a row takes in a Fetch reply
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def distinct_rows_per_read(self) -> float | None:
        """Distinct rows one read takes from the whole table (per step, in training: the client
        deduplicates a step's ids before they reach the shards)."""
        return self.rows_read / self.reads if self.reads else None

    @property
    def hot_hit_rate(self) -> float | None:
        """Share of the rows read that hot shards served."""
        return self.hot_rows_read / self.rows_read if self.rows_read else None

    @classmethod
    def from_shards(cls, parts: list[TableUsage], hot: list[bool] | None = None) -> "TableSummary":
        """One table's parts, one per shard; `hot[i]` whether part i came from a hot shard."""
        first = parts[0]
        hot = hot or [False] * len(parts)
        tiers: dict[str, TierUsage] = {}
        for part in parts:
            for t in part.tiers:
                tiers[t.tier] = tiers[t.tier] + t if t.tier in tiers else t
        rows_read = sum(p.rows_read for p in parts)
        counts = [p.collisions for p in parts if p.collisions is not None]
        return cls(name=first.name, num_rows=first.num_rows, width=first.width,
                   step=max(p.step for p in parts), rows=sum(p.rows for p in parts),
                   bytes=sum(p.bytes for p in parts),
                   optimizer_state_bytes=sum(p.optimizer_state_bytes for p in parts),
                   rows_read=rows_read, tiers=tiers,
                   hit_rate={name: t.hits / rows_read if rows_read else None for name, t in tiers.items()},
                   rows_imbalance=imbalance([p.rows for p in parts]),
                   collisions=CollisionSummary.from_shards(counts, first.num_rows) if counts else None,
                   reads=max(p.reads for p in parts), labels=first.labels,
                   dram_row_bytes=max(p.dram_row_bytes for p in parts), wire_row_bytes=first.wire_row_bytes,
                   hot_rows_read=sum(p.rows_read for p, is_hot in zip(parts, hot) if is_hot))


@dataclass(frozen=True)
class ClusterReport:
    """Every shard of one tables cluster, and what they add up to."""

    shards: tuple[ShardReport, ...]  # in shard order: the cold shards, then the hot ones

    def shards_of(self, role: str) -> list[ShardReport]:
        return [s for s in self.shards if s.role == role]

    @property
    def roles(self) -> list[str]:
        """The roles present, cold first."""
        return [role for role in ROLES if self.shards_of(role)]

    def load_imbalance_of(self, role: str) -> float | None:
        return imbalance([s.load for s in self.shards_of(role)])

    def rows_imbalance_of(self, role: str) -> float | None:
        return imbalance([s.rows for s in self.shards_of(role)])

    @property
    def load_imbalance(self) -> float | None:
        """Over the cold shards (the hot ones: load_imbalance_of("hot"))."""
        return self.load_imbalance_of("cold")

    @property
    def rows_imbalance(self) -> float | None:
        """Over the cold shards (the hot ones: rows_imbalance_of("hot"))."""
        return self.rows_imbalance_of("cold")

    def tables(self, names: list[str] | None = None) -> list[TableSummary]:
        """Per-table totals, sorted by name; only `names` when given."""
        parts: dict[str, list[TableUsage]] = {}
        hot: dict[str, list[bool]] = {}
        for shard in self.shards:
            for table in shard.tables:
                parts.setdefault(table.name, []).append(table)
                hot.setdefault(table.name, []).append(shard.role == "hot")
        return [TableSummary.from_shards(parts[name], hot[name]) for name in sorted(parts)
                if names is None or name in names]

    def to_json(self, names: list[str] | None = None) -> dict:
        """Plain data for `engram stats --json`: shards (each with its role), imbalance (the top
        keys over the cold shards; per role under "imbalance"), tables."""
        return {
            "num_shards": len(self.shards_of("cold")),  # as ClusterConfig and engram serve count them
            "num_hot": len(self.shards_of("hot")),
            "load_imbalance": self.load_imbalance,
            "rows_imbalance": self.rows_imbalance,
            "imbalance": {role: {"load": self.load_imbalance_of(role), "rows": self.rows_imbalance_of(role)}
                          for role in self.roles},
            "shards": [_shard_json(s, names) for s in self.shards],
            "tables": [_table_json(t) for t in self.tables(names)],
        }


def _shard_json(shard: ShardReport, names: list[str] | None) -> dict:
    out = {"role": shard.role, "shard_id": shard.shard_id, "uptime_s": shard.uptime_s, "wal_replayed": shard.wal_replayed,
           "metrics_port": shard.metrics_port,
           "load": shard.load, "rows": shard.rows, "counters": asdict(shard.counters),
           "tables": [_usage_json(t) for t in shard.tables if names is None or t.name in names]}
    for rpc in RPCS:
        w: RpcWindow = getattr(shard, rpc)
        out[rpc] = {**asdict(w), "requests_per_s": w.requests_per_s, "rows_per_s": w.rows_per_s}
    return out


def _usage_json(t: TableUsage) -> dict:
    return {"name": t.name, "step": t.step, "rows": t.rows, "bytes": t.bytes,
            "optimizer_state_bytes": t.optimizer_state_bytes, "rows_read": t.rows_read, "reads": t.reads,
            "labels": dict(t.labels),
            "tiers": [asdict(tier) for tier in t.tiers],
            "collisions": asdict(t.collisions) if t.collisions is not None else None}


def _table_json(t: TableSummary) -> dict:
    out = asdict(t)
    out["tiers"] = [asdict(tier) for tier in t.tiers.values()]
    out["labels"] = dict(t.labels)
    out["distinct_rows_per_read"], out["hot_hit_rate"] = t.distinct_rows_per_read, t.hot_hit_rate
    return out
