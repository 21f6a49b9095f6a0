"""Latency of small requests (issue 23's per-request cost), each beside its floor or peer.

1. A 1-id Fetch to one shard server over loopback, beside the floor of the same read in-process
   (Shard.fetch, no gRPC). The server runs in a child process (so the client's threads do not
   share its GIL); the client sends `--calls` sequential Fetch rpcs through a plain stub (no
   MemoryClient).
2. A decode step's fetch, 8 tables x 1 id, through MemoryClient against the embedded cluster
   (`start_local()`: 2 cold + 1 hot shard actors), beside a Redis MGET of 8 keys (rows of 64 fp32,
   a real redis-server on 127.0.0.1 read through redis-py + hiredis), the two interleaved run
   after run in the same minutes.

Each run reports p50 and p99 of its calls; `--runs` runs, median and [min, max] over them. Run it
under two trees to compare servers, on the same machine in the same minutes:

    PYTHONPATH=<tree> python bench/bench_small_fetch.py [--calls 2000] [--runs 3] [--skip-cluster] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import grpc
import numpy as np

from memory_service.config import TableConfig
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.shard.shard import Shard
from memory_service.wire import codec

TABLE = TableConfig(name="emb", num_rows=1000, width=64, seed=1)
NUM_TABLES = 8  # a decode step reads one row of each Engram table (layers x heads)
CHILD = """
import sys
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.config import TableConfig
shard = Shard(0, 1)
shard.create_table(TableConfig(name="emb", num_rows=1000, width=64, seed=1))
server = serve(shard)
print(server.port, flush=True)
sys.stdin.read()
server.stop(None)
"""


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """(p50, p99) in microseconds."""
    us = np.array(seconds) * 1e6
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


def rpc_run(stub, calls: int) -> tuple[float, float]:
    request = memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="emb", ids=codec.encode_ids(np.array([7])))])
    for _ in range(200):  # warm-up: channel, threads, caches
        stub.Fetch(request, timeout=10)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        stub.Fetch(request, timeout=10)
        times.append(time.perf_counter() - start)
    return percentiles(times)


def floor_run(calls: int) -> tuple[float, float]:
    shard = Shard(0, 1)
    shard.create_table(TABLE)
    ids = {"emb": np.array([7])}
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        shard.fetch(ids)
        times.append(time.perf_counter() - start)
    return percentiles(times)


def timed_calls(fn, calls: int, warmup: int = 200) -> tuple[float, float]:
    """(p50, p99) in microseconds of `calls` sequential calls of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return percentiles(times)


@contextmanager
def redis_server():
    """A redis.Redis client of a fresh redis-server on a free 127.0.0.1 port (no persistence)."""
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield client
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def cluster_runs(calls: int, runs: int) -> dict[str, list[tuple[float, float]]]:
    """8 tables x 1 id through MemoryClient on start_local(), and a Redis MGET of 8 rows, interleaved."""
    from memory_service.cluster import start_local

    rows = np.random.default_rng(0).standard_normal((NUM_TABLES, 64)).astype(np.float32)
    keys = [f"t{i}:7" for i in range(NUM_TABLES)]
    out: dict[str, list] = {"service": [], "redis": []}
    cluster = start_local(name="small-fetch")
    try:
        with cluster.client() as client, redis_server() as redis_client:
            ids = {f"t{i}": np.array([7]) for i in range(NUM_TABLES)}
            for name in ids:
                client.create_table(TableConfig(name=name, num_rows=1000, width=64, seed=1))
            redis_client.mset({key: row.tobytes() for key, row in zip(keys, rows)})

            def mget() -> np.ndarray:
                return np.frombuffer(b"".join(redis_client.mget(keys)), np.float32).reshape(NUM_TABLES, 64)

            for _ in range(runs):
                out["service"].append(timed_calls(lambda: client.fetch(ids), calls))
                out["redis"].append(timed_calls(mget, calls))
    finally:
        cluster.shutdown()
    return out


def row(name: str, runs: list[tuple[float, float]]) -> str:
    cells = []
    for k in (0, 1):
        values = [r[k] for r in runs]
        cells.append(f"{statistics.median(values):.0f} [{min(values):.0f}, {max(values):.0f}]")
    return f"| {name} | {cells[0]} | {cells[1]} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-cluster", action="store_true", help="only the 1-id Fetch to one server")
    parser.add_argument("--out", default=None, help="write the table to OUT.md (bench/report.py)")
    args = parser.parse_args()
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            rpc = [rpc_run(stub, args.calls) for _ in range(args.runs)]
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    floor = [floor_run(args.calls) for _ in range(args.runs)]
    lines = [f"`python bench/bench_small_fetch.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", "",
             f"{args.calls} sequential calls x {args.runs} runs (median [min, max] of the runs' values, us)", "",
             "| 1-id Fetch, one shard server | p50 | p99 |", "|---|---|---|",
             row("gRPC loopback (plain stub)", rpc), row("floor: Shard.fetch in-process", floor)]
    if not args.skip_cluster:
        cluster = cluster_runs(args.calls, args.runs)
        p50 = statistics.median(r[0] for r in cluster["service"]) / statistics.median(r[0] for r in cluster["redis"])
        lines += ["", f"| {NUM_TABLES} tables x 1 id | p50 | p99 |", "|---|---|---|",
                  row("MemoryClient.fetch, embedded cluster (start_local)", cluster["service"]),
                  row(f"peer: Redis MGET of {NUM_TABLES} keys (redis-py + hiredis)", cluster["redis"]),
                  "", f"service p50 / Redis p50: {p50:.1f}x (issue 23's target: p50 <= 500 us, p99 <= 2000 us)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        sys.path.insert(0, "bench")
        from report import write_results
        write_results(args.out, text)


if __name__ == "__main__":
    main()
