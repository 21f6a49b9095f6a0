"""`engram stats`: a tables cluster's utilization and collision stats as terminal tables (rich),
or as JSON for scripts.

Two tables: one row per shard, hot and cold alike, each named by its role ("cold 0", "hot 0"):
traffic over the last minute, rows and bytes held, with the imbalance of each role below; and one
row per Engram table (rows, bytes, optimizer state, memory hit rate, and the collision stats of
tables that sample them).

The tables fit the terminal: where the full tables are wider (an 80-column `kubectl exec` without a
TTY, where rich assumes 80), each splits in two narrower ones with two-line headers (shard traffic |
what shards hold; table sizes | collisions), so no cell is cut short with an ellipsis.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from memory_service.ops.reports import ClusterReport, RpcWindow, ShardReport, TableSummary
from memory_service.ops.table_groups import TableGroup
from memory_service.storage.usage import DEVICE_TIER, DISK_TIER, DRAM_TIER


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def _ratio(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _short(x: float) -> str:
    """x in at most 6 characters, 3 significant digits from 1,000 up: 950, 12.3k, 66.7M, 1.23G."""
    if x < 1000:
        return f"{x:.1f}" if x < 100 and x != int(x) else f"{x:.0f}"
    for unit in ("k", "M", "G", "T", "P"):
        x /= 1000
        if x < 999.5 or unit == "P":
            return f"{x:.3g}{unit}"


def _ms_short(seconds: float) -> str:
    """Milliseconds, 3 significant digits: 0.12, 12.3, 457."""
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


@dataclass(frozen=True)
class Column:
    """One column: its header in the full table, its (two-line) header in a narrow one, its cell,
    and its cell in a compact table (3 significant digits; None: the same). A `left` column holds
    names; a `fold` one continues a long name on the next line rather than cut it."""

    header: str
    short: str
    cell: Callable[[Any], str]
    left: bool = False
    fold: bool = False
    compact: Callable[[Any], str] | None = None


# -- shards -----------------------------------------------------------------------------------------
SHARD = Column("shard", "shard", lambda s: s.label, left=True)


def _traffic(rpc: str) -> tuple[Column, ...]:
    def window(s: ShardReport) -> RpcWindow:
        return getattr(s, rpc)

    return (Column(f"{rpc} req/s", f"{rpc}\nreq/s", lambda s: f"{window(s).requests_per_s:,.1f}",
                   compact=lambda s: _short(window(s).requests_per_s)),
            Column(f"{rpc} rows/s", f"{rpc}\nrows/s", lambda s: f"{window(s).rows_per_s:,.0f}",
                   compact=lambda s: _short(window(s).rows_per_s)),
            Column(f"{rpc} p50/p99 ms", f"{rpc} ms\np50 / p99",
                   lambda s: f"{_ms(window(s).p50_s)} / {_ms(window(s).p99_s)}",
                   compact=lambda s: f"{_ms_short(window(s).p50_s)} / {_ms_short(window(s).p99_s)}"))


TRAFFIC = (*_traffic("fetch"), *_traffic("push"))
HOLDINGS = (
    Column("rows", "rows", lambda s: f"{s.rows:,}"),
    Column("bytes", "bytes", lambda s: _bytes(sum(t.bytes for t in s.tables))),
    Column("uptime s", "uptime\ns", lambda s: f"{s.uptime_s:,.0f}"),
    Column("log replayed", "log\nreplayed", lambda s: f"{s.wal_replayed:,}"),
)

# -- tables -----------------------------------------------------------------------------------------


def _arena_hit_rate(hit_rate: dict[str, float | None]) -> float | None:
    """Share of reads served from memory: a host DRAM arena or a hot shard's device arena."""
    rates = [r for tier, r in hit_rate.items() if tier in (DRAM_TIER, DEVICE_TIER) and r is not None]
    return sum(rates) if rates else None


def _share(t: TableSummary) -> str:
    c = t.collisions
    return "off" if c is None else _ratio(c.collision_share, "{:.2%}") + ("" if c.exact else " ~")


def _collision_cell(fmt: Callable[[Any], str]) -> Callable[[TableSummary], str]:
    return lambda t: "-" if t.collisions is None else fmt(t.collisions)


TABLE = Column("table", "table", lambda t: t.name, left=True, fold=True)
SIZES = (
    Column("step", "step", lambda t: f"{t.step:,}"),
    Column("rows", "rows stored\n/ table rows", lambda t: f"{t.rows:,} / {t.num_rows:,}",
           compact=lambda t: f"{_short(t.rows)} / {_short(t.num_rows)}"),
    Column("bytes", "bytes", lambda t: _bytes(t.bytes)),
    Column("opt. state", "opt.\nstate", lambda t: _bytes(t.optimizer_state_bytes)),
    Column("arena hits", "arena\nhits", lambda t: _ratio(_arena_hit_rate(t.hit_rate), "{:.1%}")),
)
COLLISIONS = (
    Column("collision share", "collision\nshare", _share),
    Column("N-grams/slot mean (max)", "N-grams/slot\nmean (max)",
           _collision_cell(lambda c: f"{_ratio(c.mean_distinct, '{:.3f}')} ({c.max_distinct})")),
    Column("occupancy", "occupancy", _collision_cell(lambda c: f"{c.occupancy:.2%}")),
    Column("birthday bound", "birthday\nbound", _collision_cell(lambda c: f"{c.birthday_occupancy:.2%}")),
    Column("sample rate", "sample\nrate", _collision_cell(lambda c: f"{c.sample_rate:.4g}")),
)
COLLISIONS_NOTE = ("collision share: lookups landing in a slot with >= 2 distinct N-grams "
                   "(~: estimated from the slot sample); birthday bound: 1 - e^(-n/m)")


@dataclass(frozen=True)
class Layout:
    """How wide the tables are: `narrow` splits each in two with two-line headers and no outer
    border; `compact` also writes large numbers with 3 significant digits (66.7M)."""

    narrow: bool = False
    compact: bool = False


FULL, NARROW, COMPACT = Layout(), Layout(narrow=True), Layout(narrow=True, compact=True)


def _table(title: str, columns: Sequence[Column], items: Sequence, layout: Layout, caption: str | None) -> Table:
    narrow = layout.narrow
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left",
                  box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD, pad_edge=not narrow, show_edge=not narrow)
    for c in columns:
        table.add_column(c.short if narrow else c.header, justify="left" if c.left else "right",
                         no_wrap=not c.fold, overflow="fold" if c.fold else "ellipsis")
    for item in items:
        table.add_row(*((c.compact or c.cell)(item) if layout.compact else c.cell(item) for c in columns))
    return table


def _imbalance_caption(report: ClusterReport) -> str:
    parts = [f"{role}: load {_ratio(report.load_imbalance_of(role))}, rows {_ratio(report.rows_imbalance_of(role))}"
             for role in report.roles]
    return "imbalance (max/mean over shards of a role): " + "; ".join(parts)


def shards_tables(report: ClusterReport, layout: Layout = FULL) -> list[Table]:
    """One row per shard, its role in its name: recent Fetch and Push traffic and latency, rows and
    bytes held; one table, or (narrow) traffic and holdings apart."""
    title, caption = "shards (traffic over the last minute)", _imbalance_caption(report)
    if not layout.narrow:
        return [_table(title, (SHARD, *TRAFFIC, *HOLDINGS), report.shards, layout, caption)]
    return [_table(title, (SHARD, *TRAFFIC), report.shards, layout, caption),
            _table("shards (what they hold)", (SHARD, *HOLDINGS), report.shards, layout, None)]


def tables_tables(report: ClusterReport, names: list[str] | None = None, layout: Layout = FULL) -> list[Table]:
    """One row per Engram table: size, memory, hit rate and hash-collision stats; one table, or
    (narrow) sizes apart from the collisions of the tables that sample them."""
    summaries = report.tables(names)
    if not layout.narrow:
        return [_table("tables", (TABLE, *SIZES, *COLLISIONS), summaries, layout, COLLISIONS_NOTE)]
    sampled = [t for t in summaries if t.collisions is not None]
    out = [_table("tables", (TABLE, *SIZES), summaries, layout, None if sampled else "collision stats off")]
    if sampled:
        out.append(_table("collisions", (TABLE, *COLLISIONS), sampled, layout, COLLISIONS_NOTE))
    return out


def _group_columns(keys: Sequence[str]) -> tuple[Column, ...]:
    key_columns = tuple(Column(key, key, lambda g, i=i: g.key[i][1] or "-", left=True) for i, key in enumerate(keys))
    return (*key_columns,
            Column("tables", "tables", lambda g: f"{g.tables:,}"),
            Column("rows read", "rows\nread", lambda g: f"{g.rows_read:,}", compact=lambda g: _short(g.rows_read)),
            Column("rows/read", "rows\n/read", lambda g: _ratio(g.distinct_rows_per_read, "{:,.1f}")),
            Column("dram hits", "dram\nhits", lambda g: _ratio(g.hit_rate(DRAM_TIER), "{:.1%}")),
            Column("disk hits", "disk\nhits", lambda g: _ratio(g.hit_rate(DISK_TIER), "{:.1%}")),
            Column("computed", "com-\nputed", lambda g: _ratio(g.computed / g.rows_read if g.rows_read else None,
                                                               "{:.1%}")),
            Column("hot hits", "hot\nhits", lambda g: _ratio(g.hot_hit_rate, "{:.1%}")),
            Column("collision share", "collision\nshare", lambda g: _ratio(g.collision_share, "{:.2%}")),
            Column("rows stored", "rows\nstored", lambda g: f"{g.rows:,}", compact=lambda g: _short(g.rows)))


GROUPS_NOTE = ("rows/read: distinct rows one read (a training step) takes from the group's tables; hits: "
               "share of row reads each tier served (computed: never written, made from the seed); "
               "hot hits: served by hot shards")


def groups_tables(report: ClusterReport, keys: Sequence[str], names: list[str] | None = None,
                  layout: Layout = FULL) -> list[Table]:
    """One row per group of tables agreeing on `keys` (labels, or "namespace")."""
    groups = TableGroup.of(report.tables(names), keys)
    return [_table("tables by " + ", ".join(keys), _group_columns(keys), groups, layout, GROUPS_NOTE)]


# The old single-table entry points (tests, notebooks): the full layout.
def shards_table(report: ClusterReport) -> Table:
    return shards_tables(report)[0]


def tables_table(report: ClusterReport, names: list[str] | None = None) -> Table:
    return tables_tables(report, names)[0]


def _fits(console: Console, tables: list[Table], width: int) -> bool:
    """Whether every table renders within `width` columns without wrapping a cell."""
    unbounded = console.options.update_width(1 << 16)  # a measurement never exceeds the width it is given
    return all(Measurement.get(console, unbounded, t).maximum <= width for t in tables)


def render(report: ClusterReport, names: list[str] | None = None, width: int | None = None,
           console: Console | None = None, by: Sequence[str] = ()) -> Group:
    """The report's tables in the first layout (FULL, NARROW, COMPACT) whose tables fit `width`
    columns, for the shards, the tables and (with `by`) the groups apart (None: always FULL)."""
    console = console or Console(width=width or 80)
    chosen: list[Table] = []
    makers = [lambda layout: shards_tables(report, layout), lambda layout: tables_tables(report, names, layout)]
    if by:
        makers.append(lambda layout: groups_tables(report, by, names, layout))
    for make in makers:
        for layout in (FULL, NARROW, COMPACT):
            tables = make(layout)
            if width is None or _fits(console, tables, width):
                break
        chosen.extend(tables)  # the first layout that fits, else the most compact
    parts: list[RenderableType] = []
    for table in chosen:
        parts.extend([Text(""), table] if parts else [table])
    return Group(*parts)


def to_json(report: ClusterReport, names: list[str] | None = None, by: Sequence[str] = ()) -> dict:
    """The report as plain data (ClusterReport.to_json), with "groups" when grouped `by` keys."""
    out = report.to_json(names)
    if by:
        out["groups"] = [g.to_json() for g in TableGroup.of(report.tables(names), by)]
    return out


def show(fetch: Callable[[], ClusterReport], names: list[str] | None = None, as_json: bool = False,
         watch: float | None = None, console: Console | None = None, by: Sequence[str] = ()) -> None:
    """Print the report once, or with `watch` redraw it every `watch` seconds until Ctrl-C (off a
    terminal: print it again every `watch` seconds, under a time stamp); the tables fit
    `console`'s width (rich's: the terminal's, $COLUMNS, or 80 without a terminal). `by`: also
    the tables summed per group of these label keys."""
    console = console or Console()
    if as_json and watch is None:
        print(json.dumps(to_json(fetch(), names, by), indent=1))
        return
    if as_json:  # one JSON document per line, for scripts that follow a stream
        while True:
            print(json.dumps(to_json(fetch(), names, by)), flush=True)
            time.sleep(watch)

    def draw() -> Group:
        return render(fetch(), names, console.width, console, by)

    if watch is None:
        console.print(draw())
        return
    if not console.is_terminal:  # a log (kubectl logs, a file): whole tables one after another, no redraws
        while True:
            tables = draw()
            console.print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}")
            console.print(tables)
            time.sleep(watch)
    with Live(draw(), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(watch)
            live.update(draw(), refresh=True)
