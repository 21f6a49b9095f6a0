"""Fetch and push throughput of the table service against the in-process floor and a Redis peer.

Work per cell: `ids` distinct rows of `width` values out of a table whose rows are all stored
(materialised first, so no cell pays for lazy init). Bytes to move per fetch: ids x width x 4
(fp32) or x 2 (bf16) on the wire, plus 8 bytes of id per row.
Floor: `numpy.take` of the same rows from one in-process array (no serialisation, no network).
Peer: the same rows as Redis strings read with MGET (redis-py + hiredis), a common way to serve
embedding rows over loopback.

    python bench/bench_fetch.py [--ids 1024 16384 65536] [--shards 1 2 4] [--runs 3] [--repeats 20] [--cold] [--json]

The headline cell is 16k ids, fp32 x 64, 2 shards, one client, with the client's default
same-host path: direct reads, rows gathered straight from the shards' shared-memory arenas under
their version check (memory_service/wire/direct_reads.py). "Fetch rpc" is a same-host Fetch whose
rows the shards write into a shared-memory file the client owns (the path of rows on disk or behind
dense Adam's step); "gRPC reply only" is the same fetch with the rows inside the gRPC response,
what a client on another host gets.

The machine is shared and small, so one figure means little: every cluster is measured `--runs`
times, each run its floor cell, its Redis cell and its service cells back to back, so the ratios
compare the same minutes. Each cell reports the median over runs and the spread (min-max); the
headline ratios are per-run ratios, their median and their worst run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

# glibc reads these at start-up: big gRPC messages otherwise pay for mmap/munmap per message
# (measured here: ~2x loopback throughput with them). Re-exec once with them set.
from memory_service.server.shard_process import SHARD_ENV, reexec_with

reexec_with(SHARD_ENV)

from memory_service.cluster import ClusterConfig, launch  # noqa: E402
from memory_service.ray_attach import init_local_ray  # noqa: E402
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig  # noqa: E402
from report import write_results  # noqa: E402  (bench/report.py)

WIDTH = 64
HEADLINE = (16384, "float32", 2)  # (ids, dtype, shards) of the headline cell
# The service's client variants, each a fetch path: name -> MemoryClient options.
CLIENTS = {
    "fetch": {},  # same host, the default: rows gathered from the shards' shared arenas (direct reads)
    "fetch, Fetch rpc": {"direct_reads": False},  # same host: a Fetch, rows through the client's reply file
    "fetch, gRPC reply only": {"shared_memory": False},  # what a client on another host gets
}


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: connections, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cell(name: str, num_ids: int, times: list[float], **fields) -> dict:
    """One measurement: rows/s over `times` (seconds per call) and its p50/p99."""
    t = np.array(times)
    return {"path": name, "ids": num_ids, "rows_per_s": num_ids * len(t) / t.sum(),
            "p50_ms": 1e3 * float(np.percentile(t, 50)), "p99_ms": 1e3 * float(np.percentile(t, 99)), **fields}


class RedisPeer:
    """The rows as Redis strings in a real redis-server on 127.0.0.1, read with MGET (redis-py +
    hiredis), up for the whole bench so every run can measure it beside the service."""

    def __init__(self, table: np.ndarray):
        self.table, self.proc, self.client, self.workdir = table, None, None, None
        self.note = self._start()

    def _start(self) -> str:
        server = shutil.which("redis-server")
        try:
            import redis
        except ImportError:
            return "redis peer skipped: pip install redis hiredis"
        if server is None:
            return "redis peer skipped: redis-server not installed (apt-get install redis-server)"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.workdir = tempfile.mkdtemp()
        self.proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                      "--appendonly", "no", "--dir", self.workdir], stdout=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        pipe = self.client.pipeline(transaction=False)
        for i in range(len(self.table)):
            pipe.set(i, self.table[i].tobytes())
            if i % 10000 == 9999:
                pipe.execute()
        pipe.execute()
        return f"redis {redis.__version__}, hiredis parser: {redis.utils.HIREDIS_AVAILABLE}"

    def cells(self, id_sets: dict, repeats: int, run: int) -> list[dict]:
        if self.client is None:
            return []

        def mget(ids):
            raw = self.client.mget(ids.tolist())
            return np.frombuffer(b"".join(raw), np.float32).reshape(len(ids), WIDTH)

        return [cell("redis MGET peer", n, timed(lambda: mget(ids), repeats), shards=1, dtype="float32", run=run)
                for n, ids in id_sets.items()]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            shutil.rmtree(self.workdir, ignore_errors=True)


def floor_cells(table: np.ndarray, id_sets: dict, repeats: int, run: int) -> list[dict]:
    return [cell("numpy.take floor", n, timed(lambda: np.take(table, ids, axis=0), repeats), shards=0,
                 dtype="float32", run=run) for n, ids in id_sets.items()]


def cluster_runs(config: ClusterConfig, dtype: str, table: np.ndarray, id_sets: dict, args, redis: RedisPeer,
                 label: str = "service") -> list[dict]:
    """`args.runs` runs on one cluster of `config`, each: the floor, the Redis peer, then every
    client variant's fetch and the push, for every id set."""
    cluster = launch(config)
    cfg = TableConfig(name="bench", num_rows=len(table), width=WIDTH, dtype=dtype,
                      optimizer=OptimizerConfig(kind="sgd", lr=1e-3))
    out = []
    clients = {name: cluster.client(**options) for name, options in CLIENTS.items()}
    try:
        writer = clients["fetch"]
        writer.create_table(cfg)
        for start in range(0, len(table), 65536):  # materialise every row (zero gradient)
            ids = np.arange(start, min(start + 65536, len(table)))
            writer.push({"bench": (ids, np.zeros((len(ids), WIDTH), np.float32))}, step=1)
        for run in range(args.runs):
            out += floor_cells(table, id_sets, args.repeats, run) + redis.cells(id_sets, args.repeats, run)
            for n, ids in id_sets.items():
                grads = np.zeros((n, WIDTH), np.float32)
                fns = {name: (lambda c=c: c.fetch({"bench": ids})) for name, c in clients.items()}
                fns["push"] = lambda: writer.push({"bench": (ids, grads)}, step=2)
                for kind, fn in fns.items():
                    out.append(cell(f"{label} {kind}", n, timed(fn, args.repeats), shards=config.num_shards,
                                    dtype=dtype, run=run))
    finally:
        for c in clients.values():
            c.close()
        cluster.shutdown()
    return out


def summarize(cells: list[dict]) -> list[dict]:
    """Per (path, shards, dtype, ids): the median and min-max over runs of rows/s and p50."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["path"], c["shards"], c["dtype"], c["ids"]), []).append(c)
    out = []
    for (path, shards, dtype, ids), cs in groups.items():
        rates = [c["rows_per_s"] for c in cs]
        out.append({"path": path, "shards": shards, "dtype": dtype, "ids": ids, "runs": len(cs),
                    "rows_per_s": float(np.median(rates)), "rows_per_s_min": min(rates),
                    "rows_per_s_max": max(rates), "p50_ms": float(np.median([c["p50_ms"] for c in cs]))})
    return out


def headline(cells: list[dict], path: str = "service fetch") -> dict:
    """Per-run ratios of the headline cell on `path` to the floor and the Redis peer measured in
    the same run (beside the same cluster), with their median and worst run."""
    n, dtype, shards = HEADLINE
    rate = lambda p, s, d, run: next((c["rows_per_s"] for c in cells if (c["path"], c["shards"], c["dtype"],  # noqa: E731
                                      c["ids"], c["run"]) == (p, s, d, n, run)), None)
    runs = sorted({c["run"] for c in cells if c["path"] == path and c["shards"] == shards and c["dtype"] == dtype})
    per_run = []
    for run in runs:  # the floor and Redis cells of the headline cluster's runs: the latest with that run number
        floors = [c for c in cells if c["path"] == "numpy.take floor" and c["ids"] == n and c["run"] == run]
        peers = [c for c in cells if c["path"] == "redis MGET peer" and c["ids"] == n and c["run"] == run]
        fetch = rate(path, shards, dtype, run)
        floor = _beside(cells, floors, path, shards, dtype, run)
        peer = _beside(cells, peers, path, shards, dtype, run)
        per_run.append({"run": run, "rows_per_s": fetch, "of_floor": fetch / floor if floor else None,
                        "x_redis": fetch / peer if peer else None})

    def stats(key: str) -> dict | None:
        values = [r[key] for r in per_run if r[key] is not None]
        return {"median": float(np.median(values)), "min": min(values), "max": max(values)} if values else None

    return {"path": path, "runs": per_run, "rows_per_s": stats("rows_per_s"), "of_floor": stats("of_floor"),
            "x_redis": stats("x_redis")}


def _beside(cells: list[dict], candidates: list[dict], path: str, shards: int, dtype: str, run: int) -> float | None:
    """rows/s of the candidate (floor or peer) cell measured just before `path`'s cell of `run`."""
    target = next(i for i, c in enumerate(cells) if (c["path"], c["shards"], c["dtype"], c["run"]) ==
                  (path, shards, dtype, run))
    before = [c for c in candidates if cells.index(c) < target]
    return before[-1]["rows_per_s"] if before else None


def report(args, cells: list[dict], note: str) -> tuple[str, dict]:
    rows = summarize(cells)
    lines = [f"Rows of {WIDTH} values; table {args.rows:,} rows; {args.runs} runs x {args.repeats} repeats per cell "
             f"(median over runs, min-max beside it). {note}", "",
             "| path | shards | dtype | ids | rows/s (median) | min-max | p50 ms | MB/s on the wire |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        itemsize = 2 if c["dtype"] == "bfloat16" else 4
        mbps = c["rows_per_s"] * (WIDTH * itemsize + 8) / 1e6
        lines.append(f"| {c['path']} | {c['shards']} | {c['dtype']} | {c['ids']} | {c['rows_per_s']:,.0f} | "
                     f"{c['rows_per_s_min']:,.0f}-{c['rows_per_s_max']:,.0f} | {c['p50_ms']:.2f} | {mbps:,.0f} |")
    heads = {name: headline(cells, f"service {name}") for name in CLIENTS}
    lines += ["", "Headline (16k ids, fp32 x 64, 2 shards, one client), per run against the floor and the Redis "
              "peer measured beside it:"]
    for name, h in heads.items():
        if h["rows_per_s"] is None:
            continue
        r, fl, rd = h["rows_per_s"], h["of_floor"], h["x_redis"]
        lines.append(f"- {name}: {r['median']:,.0f} rows/s (min {r['min']:,.0f}, max {r['max']:,.0f}); "
                     f"{100 * fl['median']:.1f}% of the numpy.take floor (worst run {100 * fl['min']:.1f}%)"
                     + (f"; {rd['median']:.1f}x Redis MGET (worst run {rd['min']:.1f}x)" if rd else "; Redis not measured"))
    return "\n".join(lines), {"note": note, "headline": heads, "summary": rows, "cells": cells}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, nargs="+", default=[1024, 16384, 65536])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, default=262144, help="table rows (all stored)")
    p.add_argument("--runs", type=int, default=3, help="runs per cluster, each with its floor and peer cells")
    p.add_argument("--repeats", type=int, default=20, help="calls per cell and run")
    p.add_argument("--out", default="bench/results/fetch")
    p.add_argument("--cold", action="store_true",
                   help="also LMDB-backed cold shards (their DRAM budget holding every row), 2 shards")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    table = rng.standard_normal((args.rows, WIDTH)).astype(np.float32)
    id_sets = {n: rng.choice(args.rows, size=n, replace=False) for n in args.ids}
    redis = RedisPeer(table)
    cells: list[dict] = []
    try:
        init_local_ray()
        for dtype in args.dtypes:
            for shards in args.shards:
                config = ClusterConfig(num_shards=shards, name=f"bench-{shards}-{dtype}")
                cells += cluster_runs(config, dtype, table, id_sets, args, redis)
                print(f"done: {shards} shards {dtype}", file=sys.stderr)
        if args.cold:  # LMDB-backed cold shards whose DRAM budget holds every row
            with tempfile.TemporaryDirectory() as path:
                config = ClusterConfig(num_shards=2, name="bench-cold-2-float32", storage=StorageConfig(path=path))
                cells += cluster_runs(config, "float32", table, id_sets, args, redis, label="cold shards")
    finally:
        redis.close()
    text, result = report(args, cells, redis.note)
    print(text)
    write_results(args.out, text, result)
    if args.json:
        print(json.dumps(result["headline"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
