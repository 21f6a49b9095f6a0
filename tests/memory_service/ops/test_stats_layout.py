"""`engram stats`'s terminal layout, on a report of a production-sized cluster (four cold shards and
two hot ones, tables of ten million rows, busy traffic): every shard named with its role, and at 80
columns (`kubectl exec` without a TTY) no line wider and no cell cut short with an ellipsis."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from memory_service.ops import stats_view
from memory_service.ops.collisions import CollisionCounts
from memory_service.ops.reports import ClusterReport, RpcWindow, ShardCounters, ShardReport, TableUsage
from memory_service.storage.usage import DEVICE_TIER, DISK_TIER, DRAM_TIER, TierUsage

NUM_ROWS = 10_000_019
NAMES = [f"engram/layer{layer}/head{head}" for layer in (2, 15) for head in range(2)]


def busy_window(scale: float) -> RpcWindow:
    return RpcWindow(requests=int(740_000 * scale), rows=int(4e9 * scale), errors=0, window_s=60.0,
                     p50_s=0.0123 * scale, p99_s=0.45678 * scale)


def usage(name: str, role: str, k: int) -> TableUsage:
    tiers = ((TierUsage(DEVICE_TIER, 65_536, 65_536 * 512, 9_000_000),) if role == "hot" else
             (TierUsage(DRAM_TIER, 1_500_000, 1_500_000 * 1100, 80_000_000, 9_000_000),
              TierUsage(DISK_TIER, 2_400_000 + k, 3 << 30, 9_000_000)))
    collisions = CollisionCounts(0.01, 2_000_000, False, 90_000_000, 4_000_000, 20_000, 31_000, 17,
                                 900_000, 41_000, 3) if name.endswith("head0") else None
    return TableUsage(name, NUM_ROWS, 128, 1_234_567, 99_000_000, 12_345_678, 1_500_000 * 1024, tiers, collisions)


def shard(role: str, shard_id: int, num_shards: int) -> ShardReport:
    scale = 1.0 + 0.1 * shard_id
    return ShardReport(shard_id, num_shards, 1_234_567.0, ShardCounters(), busy_window(scale), busy_window(scale / 2),
                       tuple(usage(n, role, shard_id) for n in NAMES), role=role, wal_replayed=1_234_567)


REPORT = ClusterReport(tuple(shard("cold", i, 4) for i in range(4)) + tuple(shard("hot", i, 2) for i in range(2)))


def rendered(width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None)  # rich's 80 without a TTY
    stats_view.show(lambda: REPORT, console=console)
    return console.file.getvalue().splitlines()


@pytest.mark.parametrize("width", [80, 100, 200])
def test_fits_the_width_without_cutting_a_cell(width):
    lines = rendered(width)
    text = "\n".join(lines)
    print(text)
    assert max(len(line) for line in lines) <= width
    assert "…" not in text and "..." not in text
    for label in ("cold 0", "cold 3", "hot 0", "hot 1"):
        assert label in text
    for name in NAMES:
        assert name in text
    assert "9,731,078 / 10,000,019" in text or "9.73M / 10M" in text  # rows stored / table rows
    words = " ".join(text.split())  # captions wrap at the table's width
    assert "cold: load 1.13, rows 1.00; hot: load 1.05, rows 1.00" in words  # imbalance per role


def test_wide_terminals_get_one_table_per_kind():
    text = "\n".join(rendered(240))
    assert "log replayed" in text and "shards (what they hold)" not in text and "collisions\n" not in text
    narrow = "\n".join(rendered(80))
    assert "shards (what they hold)" in narrow and "collisions" in narrow


def test_json_names_each_shards_role():
    out = REPORT.to_json()
    roles = [(s["role"], s["shard_id"]) for s in out["shards"]]
    assert roles == [("cold", 0), ("cold", 1), ("cold", 2), ("cold", 3), ("hot", 0), ("hot", 1)]
    assert set(out["imbalance"]) == {"cold", "hot"} and out["load_imbalance"] == out["imbalance"]["cold"]["load"]


def test_a_long_table_name_folds_rather_than_being_cut():
    name = "engram-experiment-with-a-long-prefix/layer15/head0-of-a-very-wide-model"
    report = ClusterReport((ShardReport(0, 1, 1.0, ShardCounters(), busy_window(0.01), busy_window(0.01),
                                        (usage(name, "cold", 0),)),))
    console = Console(width=80, file=io.StringIO(), color_system=None)
    stats_view.show(lambda: report, console=console)
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in "\n".join(lines)
    assert name[:20] in "\n".join(lines)


def test_watch_off_a_terminal_prints_whole_reports_one_after_another():
    """`engram stats --watch` in a log (kubectl logs, a file): each report printed in full under a
    time stamp, no cursor moves; Ctrl-C (here: the third fetch) ends it."""
    fetched = []

    def fetch() -> ClusterReport:
        fetched.append(1)
        if len(fetched) == 3:
            raise KeyboardInterrupt
        return REPORT

    console = Console(width=80, file=io.StringIO(), color_system=None)
    with pytest.raises(KeyboardInterrupt):
        stats_view.show(fetch, watch=0.01, console=console)
    out = console.file.getvalue()
    assert out.count("\n-- ") + out.startswith("-- ") == 2 and out.count("shards (traffic") == 2
    assert "\x1b" not in out and "\r" not in out
