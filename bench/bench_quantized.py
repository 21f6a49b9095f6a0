"""Bytes per row and fetch throughput of frozen tables: bf16 rows against fp8 e4m3 and int8 (issue 24).

One cold shard with LMDB in a temp dir, served over real gRPC on 127.0.0.1 in this process, holds
three tables of width 160 with every row written (one SGD step), then frozen in place: "bf16"
(dtype bfloat16, quantization none: the floor), "fp8" and "int8". Reported per table:
- the row as stored (the arena's and LMDB's row bytes) and as sent (a Fetch reply's), each with its
  ratio to a bf16 row (2 * width = 320 bytes; the acceptance: <= 0.55);
- DRAM bytes per row (row, id, last step, dirty flag; the index not counted) and LMDB bytes per row
  measured (the table's LMDB pages / its rows);
- fetch throughput through MemoryClient (Fetch rpcs, direct reads off: frozen quantized tables are
  not published for them, so all three take the same path), rows/s of a 16384-id fetch, the
  median of `--repeats` fetches per run, median [min, max] over `--runs` runs (interleaved).

    python bench/bench_quantized.py [--runs 3] [--repeats 10] [--out bench/results/quantized]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from memory_service.client import MemoryClient  # noqa: E402
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig  # noqa: E402
from memory_service.server.servicer import serve  # noqa: E402
from memory_service.shard.shard import Shard  # noqa: E402
from report import write_results  # noqa: E402  (bench/report.py)

WIDTH = 160
ROWS = 65536
FETCH_IDS = 16384
KINDS = {"bf16": "none", "fp8": "fp8_e4m3", "int8": "int8"}


def build(client: MemoryClient) -> None:
    """Creates the tables, writes every row with one SGD step, freezes them."""
    rng = np.random.default_rng(0)
    for name, kind in KINDS.items():
        client.create_table(TableConfig(name, ROWS, WIDTH, dtype="bfloat16", optimizer=OptimizerConfig("sgd", lr=1.0)))
        for start in range(0, ROWS, 8192):
            ids = np.arange(start, start + 8192)
            client.push({name: (ids, rng.standard_normal((len(ids), WIDTH)).astype(np.float32))}, step=1)
        client.freeze_table(name, kind)


def fetch_rate(client: MemoryClient, name: str, repeats: int, rng: np.random.Generator) -> float:
    """Rows per second of a FETCH_IDS-id fetch of table `name`: the median of `repeats` (after 2 warm-ups)."""
    times = []
    for k in range(repeats + 2):
        ids = rng.choice(ROWS, FETCH_IDS, replace=False)
        start = time.perf_counter()
        client.fetch({name: ids})
        if k >= 2:
            times.append(time.perf_counter() - start)
    return FETCH_IDS / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "quantized"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = Shard(0, 1, StorageConfig(path=tmp, dram_budget_bytes=1 << 30))
        server = serve(shard)
        try:
            with MemoryClient([server.address], direct_reads=False) as client:
                build(client)
                shard.flush()
                usage = {t.name: t for t in client.report().shards[0].tables}
                rates = {name: [] for name in KINDS}
                rng = np.random.default_rng(1)
                for _ in range(args.runs):  # interleaved: a noisy moment hits every table
                    for name in KINDS:
                        rates[name].append(fetch_rate(client, name, args.repeats, rng))
        finally:
            server.stop(grace=None)
            shard.close()
    text = report(usage, rates, args)
    print(text)
    write_results(args.out, text, {name: {"wire_row_bytes": usage[name].wire_row_bytes,
                                          "dram_row_bytes": usage[name].dram_row_bytes,
                                          "rows_per_s": statistics.median(rates[name])} for name in KINDS})
    return 0


def report(usage: dict, rates: dict[str, list[float]], args: argparse.Namespace) -> str:
    bf16_row = 2 * WIDTH
    floor = statistics.median(rates["bf16"])
    lines = [f"# Frozen tables: bytes per row and fetch throughput (width {WIDTH}, {ROWS} rows, all written)",
             "",
             f"One cold shard (LMDB + DRAM), served over gRPC on 127.0.0.1; fetch: {FETCH_IDS} distinct random ids,",
             f"median of {args.repeats} fetches per run, median [min, max] of {args.runs} interleaved runs. "
             f"A bf16 row: {bf16_row} bytes. `python bench/bench_quantized.py`",
             "",
             "| table | stored row B (x bf16) | wire row B (x bf16) | DRAM B/row | LMDB B/row (pages) | "
             "fetch Mrows/s | x bf16 table |",
             "|---|---|---|---|---|---|---|"]
    for name in KINDS:
        t = usage[name]
        stored = t.disk_row_bytes - 8  # the record less its last step: the row itself
        disk = next(x for x in t.tiers if x.tier == "disk")
        rate = statistics.median(rates[name])
        wire = t.wire_row_bytes
        lines.append(f"| {name} | {stored} ({stored / bf16_row:.2f}) | {wire} ({wire / bf16_row:.2f}) "
                     f"| {t.dram_row_bytes} | {disk.bytes / max(disk.rows, 1):.0f} | "
                     f"{rate / 1e6:.2f} [{min(rates[name]) / 1e6:.2f}, {max(rates[name]) / 1e6:.2f}] | "
                     f"{rate / floor:.2f} |")
    lines += ["", "The bf16 table stores its rows in float32 (the service's storage dtype) and sends them in bf16; "
              "fp8 and int8 tables store and send 4 + width bytes a row (a float32 scale and the codes)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
