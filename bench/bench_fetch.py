"""Fetch and push throughput of the table service against the in-process floor and a Redis peer.

Work per cell: `ids` distinct rows of `width` values out of a table whose rows are all stored
(materialised first, so no cell pays for lazy init). Bytes to move per fetch: ids x width x 4
(fp32) or x 2 (bf16) on the wire, plus 8 bytes of id per row.
Floor: `numpy.take` of the same rows from one in-process array (no serialisation, no network).
Peer: the same rows as Redis strings read with MGET (redis-py + hiredis), a common way to serve
embedding rows over loopback.

    python bench/bench_fetch.py [--ids 1024 16384 65536] [--shards 1 2 4] [--repeats 20] [--cold] [--json]

The headline cell is 16k ids, fp32 x 64, 2 shards, one client, with the client's default
same-host path (rows written into a shared-memory file the client owns); "gRPC reply only" is the
same fetch with the rows inside the gRPC response, what a client on another host gets.
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


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: connections, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cell(name: str, num_ids: int, times: list[float]) -> dict:
    t = np.array(times)
    return {"path": name, "ids": num_ids, "rows_per_s": num_ids * len(t) / t.sum(),
            "p50_ms": 1e3 * float(np.percentile(t, 50)), "p99_ms": 1e3 * float(np.percentile(t, 99))}


def service_cells(num_shards: int, dtype: str, table: np.ndarray, id_sets: dict, repeats: int,
                  cold: bool = False) -> list[dict]:
    """Fetch and push cells of `num_shards` all-DRAM shards, or with `cold` LMDB-backed cold
    shards (files in a temporary directory) whose DRAM budget holds every row: what LMDB and
    placement cost a cold shard when nothing has to come from disk."""
    if cold:
        with tempfile.TemporaryDirectory() as path:
            cells = service_cells_of(ClusterConfig(num_shards=num_shards, name=f"bench-cold-{num_shards}-{dtype}",
                                                   storage=StorageConfig(path=path)), dtype, table, id_sets, repeats)
        return [{**c, "path": c["path"].replace("service", "cold shards")} for c in cells]
    return service_cells_of(ClusterConfig(num_shards=num_shards, name=f"bench-{num_shards}-{dtype}"),
                            dtype, table, id_sets, repeats)


def service_cells_of(config: ClusterConfig, dtype: str, table: np.ndarray, id_sets: dict, repeats: int) -> list[dict]:
    num_shards = config.num_shards
    cluster = launch(config)
    cfg = TableConfig(name="bench", num_rows=len(table), width=WIDTH, dtype=dtype,
                      optimizer=OptimizerConfig(kind="sgd", lr=1e-3))
    out = []
    with cluster.client() as client, cluster.client(shared_memory=False) as grpc_only:
        client.create_table(cfg)
        for start in range(0, len(table), 65536):  # materialise every row (zero gradient)
            ids = np.arange(start, min(start + 65536, len(table)))
            client.push({"bench": (ids, np.zeros((len(ids), WIDTH), np.float32))}, step=1)
        for n, ids in id_sets.items():
            grads = np.zeros((n, WIDTH), np.float32)
            for kind, fn in (("fetch", lambda: client.fetch({"bench": ids})),
                             ("fetch, gRPC reply only", lambda: grpc_only.fetch({"bench": ids})),
                             ("push", lambda: client.push({"bench": (ids, grads)}, step=2))):
                out.append({**cell(f"service {kind}", n, timed(fn, repeats)), "shards": num_shards, "dtype": dtype})
    cluster.shutdown()
    return out


def floor_cells(table: np.ndarray, id_sets: dict, repeats: int) -> list[dict]:
    return [{**cell("numpy.take floor", n, timed(lambda: np.take(table, ids, axis=0), repeats)),
             "shards": 0, "dtype": "float32"} for n, ids in id_sets.items()]


def redis_cells(table: np.ndarray, id_sets: dict, repeats: int) -> tuple[list[dict], str]:
    """The same rows in a real redis-server on 127.0.0.1, read with MGET. Returns (cells, note)."""
    server = shutil.which("redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        return [], "redis peer skipped: pip install redis hiredis"
    if server is None:
        return [], "redis peer skipped: redis-server not installed (apt-get install redis-server)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        import redis

        r = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        pipe = r.pipeline(transaction=False)
        for i in range(len(table)):
            pipe.set(i, table[i].tobytes())
            if i % 10000 == 9999:
                pipe.execute()
        pipe.execute()

        def mget(ids):
            raw = r.mget(ids.tolist())
            return np.frombuffer(b"".join(raw), np.float32).reshape(len(ids), WIDTH)

        cells = [{**cell("redis MGET peer", n, timed(lambda: mget(ids), repeats)), "shards": 1, "dtype": "float32"}
                 for n, ids in id_sets.items()]
        return cells, f"redis {redis.__version__}, hiredis parser: {redis.utils.HIREDIS_AVAILABLE}"
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, nargs="+", default=[1024, 16384, 65536])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, default=262144, help="table rows (all stored)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="bench/results/fetch")
    p.add_argument("--cold", action="store_true",
                   help="also LMDB-backed cold shards (their DRAM budget holding every row), 2 shards")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    table = rng.standard_normal((args.rows, WIDTH)).astype(np.float32)
    id_sets = {n: rng.choice(args.rows, size=n, replace=False) for n in args.ids}
    cells = floor_cells(table, id_sets, args.repeats)
    redis, note = redis_cells(table, id_sets, args.repeats)
    cells += redis
    init_local_ray()
    for dtype in args.dtypes:
        for shards in args.shards:
            cells += service_cells(shards, dtype, table, id_sets, args.repeats)
            print(f"done: {shards} shards {dtype}", file=sys.stderr)
    if args.cold:
        cells += service_cells(2, "float32", table, id_sets, args.repeats, cold=True)

    def find(path: str, shards: int) -> float | None:
        """rows/s of the headline size (16k ids, fp32) on `path`."""
        return next((c["rows_per_s"] for c in cells if c["path"] == path and c["ids"] == 16384
                     and c["dtype"] == "float32" and c["shards"] == shards), None)

    headline = {"fetch_rows_per_s": find("service fetch", 2), "floor_rows_per_s": find("numpy.take floor", 0),
                "redis_rows_per_s": find("redis MGET peer", 1)}
    lines = [f"Rows of {WIDTH} values; table {args.rows:,} rows; {args.repeats} repeats per cell. {note}", "",
             "| path | shards | dtype | ids | rows/s | p50 ms | p99 ms | MB/s on the wire |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        itemsize = 2 if c["dtype"] == "bfloat16" else 4
        mbps = c["rows_per_s"] * (WIDTH * itemsize + 8) / 1e6
        lines.append(f"| {c['path']} | {c['shards']} | {c['dtype']} | {c['ids']} | {c['rows_per_s']:,.0f} | "
                     f"{c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {mbps:,.0f} |")
    f, fl, rd = headline["fetch_rows_per_s"], headline["floor_rows_per_s"], headline["redis_rows_per_s"]
    lines += ["", f"headline (16k ids, fp32 x 64, 2 shards, one client): fetch {f:,.0f} rows/s = "
              f"{100 * f / fl:.1f}% of the numpy.take floor ({fl:,.0f})"
              + (f", {f / rd:.1f}x the Redis MGET peer ({rd:,.0f})" if rd else ", Redis peer not measured")]
    if args.cold:
        headline["cold_fetch_rows_per_s"] = cold = find("cold shards fetch", 2)
        lines.append(f"cold shards (LMDB under a DRAM budget holding every row), same cell: {cold:,.0f} rows/s "
                     f"= {cold / f:.2f} of all-DRAM shards")
    text = "\n".join(lines)
    print(text)
    result = {**headline, "note": note, "cells": cells}
    write_results(args.out, text, result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
