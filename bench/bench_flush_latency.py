"""Fetch latency while a cold shard flushes and while it saves a checkpoint (issue 22).

One cold shard with LMDB serves gRPC from a process of its own (the real `Shard` and servicer,
started by subprocess as bench/shard_processes.py does). Its table (`--rows` x `--width` fp32,
sparse Adam: 3 x width floats per row) gets `--dirty` distinct rows pushed twice, so that all of
them are resident and dirty in DRAM (the first push writes them to LMDB and copies them in, the
second updates the copies). A client thread then fetches `--fetch` random written rows in a loop,
timing each fetch, while, in turn:

- nothing happens for `--idle` seconds (the floor);
- the shard flushes (Shard.flush: the dirty rows to LMDB and a new write-ahead log), told over
  its stdin;
- the rows are pushed again (dirty again) and a CheckpointSave of the table is sent over gRPC.

Printed per phase: fetch p50 / p99 / max (ms) and count, and how long the flush and the save took.
`--runs` fresh shards; the summary gives the median and the spread (min-max) of each figure.

    python bench/bench_flush_latency.py [--dirty 65536] [--width 64] [--runs 3] [--out bench/results/flush_latency]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, REPO_ROOT)

TABLE = "flushbench"


# -- the shard process ------------------------------------------------------------------------------
def serve(spec: dict) -> None:
    """The child: a cold shard on `spec['path']` serving gRPC; each stdin line "flush" runs a
    flush and answers {"start", "end"} (time.monotonic, one clock for both processes on Linux)."""
    import dataclasses

    from memory_service.config import StorageConfig
    from memory_service.server.servicer import serve as serve_grpc
    from memory_service.shard.shard import Shard

    storage = StorageConfig(path=spec["path"], dram_budget_bytes=spec["budget"], flush_interval_s=3600,
                            flush_wal_bytes=1 << 40)
    if "checkpoint_root" in {f.name for f in dataclasses.fields(StorageConfig)}:
        storage = dataclasses.replace(storage, checkpoint_root=spec["checkpoints"])
    shard = Shard(0, 1, storage)
    server = serve_grpc(shard, host="127.0.0.1", port=0)
    print(json.dumps({"target": server.address}), flush=True)
    for line in sys.stdin:
        if line.strip() == "flush":
            start = time.monotonic()
            shard.flush()
            print(json.dumps({"start": start, "end": time.monotonic()}), flush=True)
    server.stop(1.0)
    shard.close()


# -- the client -------------------------------------------------------------------------------------
class Fetcher(threading.Thread):
    """Fetches `n` random rows of `ids` in a loop; keeps (start, seconds) of each fetch."""

    def __init__(self, client, ids: np.ndarray, n: int) -> None:
        super().__init__(daemon=True)
        self.client, self.ids, self.n = client, ids, n
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(1)
        while not self.stop.is_set():
            ids = np.unique(rng.choice(self.ids, self.n))
            start = time.monotonic()
            self.client.fetch({TABLE: ids})
            self.samples.append((start, time.monotonic() - start))

    def during(self, start: float, end: float) -> np.ndarray:
        """Latencies (s) of the fetches that overlapped [start, end]."""
        return np.array([s for t, s in self.samples if t <= end and t + s >= start])


def stats(latencies: np.ndarray) -> dict:
    if not len(latencies):
        return {"count": 0}
    ms = latencies * 1e3
    return {"count": int(len(ms)), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def one_run(args, run: int) -> dict:
    from memory_service.client import MemoryClient
    from memory_service.config import OptimizerConfig, TableConfig
    from memory_service.rpc import memory_pb2

    tmp = Path(tempfile.mkdtemp(prefix="flushbench-"))
    (tmp / "ck").mkdir()
    budget = 2 * args.dirty * (17 + 12 * args.width) + (64 << 20)
    spec = {"path": str(tmp / "lmdb"), "budget": budget, "checkpoints": str(tmp / "ck")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        target = json.loads(proc.stdout.readline())["target"]
        client = MemoryClient([target], shared_memory=False, timeout=120)
        client.create_table(TableConfig(TABLE, args.rows, args.width, optimizer=OptimizerConfig("sparse_adam")))
        rng = np.random.default_rng(run)
        ids = np.sort(rng.choice(args.rows, args.dirty, replace=False))
        step = 0
        for _ in range(2):  # written to LMDB and copied in; then the resident copies updated: dirty
            step += 1
            client.push({TABLE: (ids, rng.standard_normal((len(ids), args.width)).astype(np.float32))},
                        step=step, lr=0.01)
        fetcher = Fetcher(client, ids, args.fetch)
        fetcher.start()
        time.sleep(args.idle)
        idle_end = time.monotonic()
        proc.stdin.write("flush\n")
        proc.stdin.flush()
        flush = json.loads(proc.stdout.readline())
        time.sleep(0.5)
        step += 1  # dirty again
        client.push({TABLE: (ids, rng.standard_normal((len(ids), args.width)).astype(np.float32))}, step=step,
                    lr=0.01)
        time.sleep(0.5)
        (tmp / "ck" / "c1").mkdir()
        save_start = time.monotonic()
        client.stubs[0].CheckpointSave(memory_pb2.CheckpointSaveRequest(
            path=str(tmp / "ck" / "c1"), step=step, tables=[TABLE], wait_seconds=10), timeout=300)
        save_end = time.monotonic()
        time.sleep(0.3)
        fetcher.stop.set()
        fetcher.join()
        first = fetcher.samples[0][0]
        idle = np.array([s for t, s in fetcher.samples if t >= first + 0.5 and t + s <= idle_end])
        result = {"idle": stats(idle),
                  "flush": stats(fetcher.during(flush["start"], flush["end"])),
                  "checkpoint": stats(fetcher.during(save_start, save_end)),
                  "flush_s": flush["end"] - flush["start"], "checkpoint_s": save_end - save_start}
        client.close()
        return result
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def summary(runs: list[dict]) -> dict:
    out = {}
    for phase in ("idle", "flush", "checkpoint"):
        for key in ("p50_ms", "p99_ms", "max_ms", "count"):
            values = [r[phase].get(key, float("nan")) for r in runs]
            out[f"{phase}.{key}"] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    for key in ("flush_s", "checkpoint_s"):
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def markdown(args, runs: list[dict], summ: dict, label: str) -> str:
    lines = [f"### {label}", "",
             f"{args.dirty:,} dirty rows x width {args.width} (sparse Adam), fetches of {args.fetch} rows in a "
             f"loop; {len(runs)} runs, median (min-max)", "",
             "| phase | fetches | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for phase in ("idle", "flush", "checkpoint"):
        cells = [f"{summ[f'{phase}.{k}']['median']:.1f} ({summ[f'{phase}.{k}']['min']:.1f}-"
                 f"{summ[f'{phase}.{k}']['max']:.1f})" for k in ("p50_ms", "p99_ms", "max_ms")]
        lines.append(f"| {phase} | {summ[f'{phase}.count']['median']:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"flush took {summ['flush_s']['median']:.2f} s ({summ['flush_s']['min']:.2f}-"
                 f"{summ['flush_s']['max']:.2f}), the checkpoint save {summ['checkpoint_s']['median']:.2f} s "
                 f"({summ['checkpoint_s']['min']:.2f}-{summ['checkpoint_s']['max']:.2f})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dirty", type=int, default=65536)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--fetch", type=int, default=256)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--out", default=None, help="append the table to OUT.md and the runs to OUT.json")
    args = parser.parse_args()
    if args.serve is not None:
        serve(json.loads(args.serve))
        return
    runs = []
    for run in range(args.runs):
        runs.append(one_run(args, run))
        print(json.dumps(runs[-1]), flush=True)
    summ = summary(runs)
    text = markdown(args, runs, summ, args.label)
    print(text)
    if args.out:
        path = Path(args.out)
        data = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
        data[args.label] = {"args": {k: v for k, v in vars(args).items() if k not in ("serve", "out")},
                            "runs": runs, "summary": summ}
        path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        with open(path.with_suffix(".md"), "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
