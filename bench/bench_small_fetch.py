"""Latency of one small request: a 1-id Fetch to one shard server over loopback (issue 23's
per-request cost), beside the floor of the same read in-process (Shard.fetch, no gRPC).

The shard server runs in a child process (so the client's threads do not share its GIL); the
client sends `--calls` sequential Fetch rpcs of 1 id through a plain stub (no MemoryClient) and
reports p50 and p99 per run; `--runs` runs, median and spread. Run it under two trees to compare
servers, on the same machine in the same minutes:

    PYTHONPATH=<tree> python bench/bench_small_fetch.py [--calls 2000] [--runs 3] [--out PATH]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import grpc
import numpy as np

from memory_service.config import TableConfig
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.shard.shard import Shard
from memory_service.wire import codec

TABLE = TableConfig(name="emb", num_rows=1000, width=64, seed=1)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
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
    lines = [f"1-id Fetch, {args.calls} sequential calls x {args.runs} runs (median [min, max] of the runs' values, us)",
             "| path | p50 | p99 |", "|---|---|---|"]
    for name, runs in (("gRPC loopback", rpc), ("floor: Shard.fetch in-process", floor)):
        cells = []
        for k in (0, 1):
            values = [r[k] for r in runs]
            cells.append(f"{statistics.median(values):.0f} [{min(values):.0f}, {max(values):.0f}]")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        sys.path.insert(0, "bench")
        from report import write_results
        write_results(args.out, text)


if __name__ == "__main__":
    main()
