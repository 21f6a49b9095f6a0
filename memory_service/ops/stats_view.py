"""`engram stats`: a tables cluster's utilization and collision stats as terminal tables (rich),
or as JSON for scripts.

Two tables: one row per shard (traffic over the last minute, rows and bytes held) with the
cluster's imbalance below it, and one row per Engram table (rows, bytes, optimizer state, memory
hit rate, and the collision stats of tables that sample them).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from memory_service.ops.reports import ClusterReport
from memory_service.storage.usage import DEVICE_TIER, DRAM_TIER


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


def shards_table(report: ClusterReport) -> Table:
    """One row per shard: recent Fetch and Push traffic and latency, rows and bytes held."""
    table = Table(title="shards (traffic over the last minute)", title_justify="left")
    for header in ("shard", "fetch req/s", "fetch rows/s", "fetch p50/p99 ms", "push req/s",
                   "push rows/s", "push p50/p99 ms", "rows", "bytes", "uptime s", "log replayed"):
        table.add_column(header, justify="left" if header == "shard" else "right")
    for s in report.shards:
        table.add_row(str(s.shard_id),
                      f"{s.fetch.requests_per_s:,.1f}", f"{s.fetch.rows_per_s:,.0f}",
                      f"{_ms(s.fetch.p50_s)} / {_ms(s.fetch.p99_s)}",
                      f"{s.push.requests_per_s:,.1f}", f"{s.push.rows_per_s:,.0f}",
                      f"{_ms(s.push.p50_s)} / {_ms(s.push.p99_s)}",
                      f"{s.rows:,}", _bytes(sum(t.bytes for t in s.tables)), f"{s.uptime_s:,.0f}",
                      f"{s.wal_replayed:,}")
    table.caption = (f"imbalance (max/mean over shards): load {_ratio(report.load_imbalance)}, "
                     f"rows {_ratio(report.rows_imbalance)}")
    table.caption_justify = "left"
    return table


def _arena_hit_rate(hit_rate: dict[str, float | None]) -> float | None:
    """Share of reads served from memory: a host DRAM arena or a hot shard's device arena."""
    rates = [r for tier, r in hit_rate.items() if tier in (DRAM_TIER, DEVICE_TIER) and r is not None]
    return sum(rates) if rates else None


def tables_table(report: ClusterReport, names: list[str] | None = None) -> Table:
    """One row per Engram table: size, memory, hit rate and hash-collision stats."""
    table = Table(title="tables", title_justify="left")
    for header in ("table", "step", "rows", "bytes", "opt. state", "arena hits", "collision share",
                   "N-grams/slot mean (max)", "occupancy", "birthday bound", "sample rate"):
        table.add_column(header, justify="left" if header == "table" else "right")
    for t in report.tables(names):
        c = t.collisions
        if c is None:
            collision = ["off", "-", "-", "-", "-"]
        else:
            share = _ratio(c.collision_share, "{:.2%}") + ("" if c.exact else " ~")
            collision = [share, f"{_ratio(c.mean_distinct, '{:.3f}')} ({c.max_distinct})",
                         f"{c.occupancy:.2%}", f"{c.birthday_occupancy:.2%}", f"{c.sample_rate:.4g}"]
        table.add_row(t.name, f"{t.step:,}", f"{t.rows:,} / {t.num_rows:,}", _bytes(t.bytes),
                      _bytes(t.optimizer_state_bytes),
                      _ratio(_arena_hit_rate(t.hit_rate), "{:.1%}"), *collision)
    table.caption = ("collision share: lookups landing in a slot with >= 2 distinct N-grams "
                     "(~: estimated from the slot sample); birthday bound: 1 - e^(-n/m)")
    table.caption_justify = "left"
    return table


def render(report: ClusterReport, names: list[str] | None = None) -> Group:
    return Group(shards_table(report), Text(""), tables_table(report, names))


def show(fetch: Callable[[], ClusterReport], names: list[str] | None = None, as_json: bool = False,
         watch: float | None = None, console: Console | None = None) -> None:
    """Print the report once, or with `watch` redraw it every `watch` seconds until Ctrl-C."""
    console = console or Console()
    if as_json and watch is None:
        print(json.dumps(fetch().to_json(names), indent=1))
        return
    if as_json:  # one JSON document per line, for scripts that follow a stream
        while True:
            print(json.dumps(fetch().to_json(names)), flush=True)
            time.sleep(watch)
    if watch is None:
        console.print(render(fetch(), names))
        return
    with Live(render(fetch(), names), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(watch)
            live.update(render(fetch(), names), refresh=True)
