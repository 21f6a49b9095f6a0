"""Soak: 8 concurrent clients of mixed traffic against the embedded cluster's shards on 127.0.0.1
for a bounded time (10 minutes by default), counting errors and watching every shard process's
memory (issue 22's acceptance: 0 errors, RSS slope over the last 5 minutes <= 1 MiB/min).

A real local Ray cluster (memory_service.cluster.start_local, 2 cold shards, no hot one) serves
one table per client and one table all clients share. Each client is a thread with a MemoryClient
of its own. Before the clock starts a warm-up writes every row the soak will touch (a push over
each table's id set), so rows created lazily on first write do not count as growth. Then each
client, until the time is up, draws one of:
- a fetch of 1024 ids of its table and 1024 of the shared one (45%);
- a training step (50%): a held fetch of its table for the next step (fetch_async with
  min_step = step + 1, as a trainer prefetches), then a push of 512 ids of its table as that step
  (push commits the step on every shard, which releases the held fetch), a push of 512 ids to the
  shared table, and the held fetch's rows;
- the cluster's stats (client.report(), what `engram stats` shows) (5%).
Pushes are valid under concurrency by design: a client's own table gets that client's steps in
order (dense Adam tables take nothing else), and the shared table, a sparse_adam one (any step
order), gets steps drawn from one counter all clients share, so no step is pushed twice.

The clients first run the same load for `--settle-seconds` (30) unmeasured, so the allocators reach
their high-water mark of concurrent request buffers before the clock starts. Errors count from
the start.

Memory: every `--sample-seconds` (2) each shard process's anonymous RSS (ShardActor.rss_bytes,
RssAnon). The figure: the least-squares slope of the shards' summed RSS over the last half of the
measured run (the last 5 minutes of the default 10), in MiB/min. Acceptance: 0 errors and that
slope <= 1 MiB/min.

    python bench/soak.py [--seconds 600] [--settle-seconds 30] [--clients 8] [--shards 2] [--json]
                         [--processes]

`--processes`: the same shards as plain local processes (bench/shard_processes.py) instead of Ray
actors, their RSS read from /proc: for a machine too loaded for Ray to start (its node start-up
times out at 30 s), or to look at the shards without Ray's own threads.

Writes bench/results/soak.md and .json (`--out` elsewhere); prints the report (with --json only the
JSON object: `requests`, `errors`, `rss_slope_last_half_mib_per_min`, `passed`, ...).
"""
from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from memory_service.cluster import start_local
from memory_service.config import OptimizerConfig, TableConfig
from report import write_results  # bench/report.py

WIDTH = 64
NUM_ROWS = 1 << 20  # per table; only `--rows-per-table` of them are ever touched
FETCH_IDS, PUSH_IDS = 1024, 512
WINDOW_S = 10.0  # RSS windows at the start and the end of the soak


@dataclass
class ClientLog:
    """What one client saw: call latencies (s) by kind, and errors."""

    fetch_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # held fetch + pushes + the held rows
    stats_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def tables(num_clients: int) -> list[TableConfig]:
    """One table per client (adam and sparse_adam alternately) and the shared sparse_adam table."""
    own = [TableConfig(name=f"soak/client{c}", num_rows=NUM_ROWS, width=WIDTH, seed=c, init_scale=0.02,
                       optimizer=OptimizerConfig(kind="adam" if c % 2 == 0 else "sparse_adam", lr=1e-3))
           for c in range(num_clients)]
    shared = TableConfig(name="soak/shared", num_rows=NUM_ROWS, width=WIDTH, seed=99, init_scale=0.02,
                         optimizer=OptimizerConfig(kind="sparse_adam", lr=1e-3))
    return [*own, shared]


def warm_up(client, cfgs: list[TableConfig], id_sets: dict[str, np.ndarray]) -> None:
    """Writes every row the soak will touch (step 1 of each client table; step 1 of the shared
    one), so every later access finds its row stored."""
    for cfg in cfgs:
        client.create_table(cfg)
    for name, ids in id_sets.items():  # a table per push: smaller messages
        client.push({name: (ids, np.zeros((len(ids), WIDTH), np.float32))}, step=1)


class Soak:
    """Clients running until `deadline` (latencies counted from `measure_from`, monotonic
    seconds), with the shared table's step counter."""

    def __init__(self, cluster, cfgs: list[TableConfig], id_sets: dict[str, np.ndarray], measure_from: float,
                 deadline: float):
        self.cluster, self.cfgs, self.id_sets = cluster, cfgs, id_sets
        self.measure_from, self.deadline = measure_from, deadline
        self.shared_steps = itertools.count(2)  # step 1 was the warm-up's
        self.lock = threading.Lock()

    def next_shared_step(self) -> int:
        with self.lock:
            return next(self.shared_steps)

    def run_client(self, c: int, log: ClientLog) -> None:
        own, shared = self.cfgs[c].name, self.cfgs[-1].name
        rng = np.random.default_rng(1000 + c)
        step = 1  # the warm-up pushed step 1 of every table
        with self.cluster.client(client_id=f"soak-{c}", timeout=30.0) as client:
            while time.monotonic() < self.deadline:
                kind = rng.random()
                measured = time.monotonic() >= self.measure_from
                try:
                    start = time.perf_counter()
                    if kind < 0.45:
                        client.fetch({own: rng.choice(self.id_sets[own], FETCH_IDS),
                                      shared: rng.choice(self.id_sets[shared], FETCH_IDS)})
                        times = log.fetch_s
                    elif kind < 0.95:
                        held = client.fetch_async({own: rng.choice(self.id_sets[own], FETCH_IDS)}, min_step=step + 1)
                        ids = rng.choice(self.id_sets[own], PUSH_IDS)
                        grads = rng.standard_normal((PUSH_IDS, WIDTH)).astype(np.float32)
                        client.push({own: (ids, grads)}, step=step + 1)  # this client's own steps, in order
                        step += 1
                        shared_ids = rng.choice(self.id_sets[shared], PUSH_IDS)
                        client.push({shared: (shared_ids, grads)}, step=self.next_shared_step())
                        held.result(timeout=30.0)
                        times = log.step_s
                    else:
                        client.report()
                        times = log.stats_s
                    if measured:
                        times.append(time.perf_counter() - start)
                except Exception as err:  # counted and shown: the acceptance is zero of them
                    log.errors.append(f"client {c}: {type(err).__name__}: {err}")


def sample_rss(read_rss, start: float, stop: threading.Event, samples: list, interval_s: float = 1.0) -> None:
    """(seconds since `start` (monotonic), read_rss() = [RssAnon of each shard]) every
    `interval_s` from `start` until `stop`."""
    stop.wait(max(0.0, start - time.monotonic()))
    while not stop.is_set():
        samples.append((time.monotonic() - start, read_rss()))
        stop.wait(interval_s)


def proc_rss_anon(pid: int) -> int:
    """RssAnon of process `pid` in bytes (/proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def start_shards(processes: bool, num_shards: int):
    """(the cluster handle (client(), shutdown()), a function giving each shard's RssAnon)."""
    if processes:
        from shard_processes import start_processes  # bench/shard_processes.py

        shards = start_processes(num_shards=num_shards, num_hot=0)
        return shards, lambda: [proc_rss_anon(pid) for pid in shards.pids]
    cluster = start_local(num_shards=num_shards, num_hot=0, name="soak")
    return cluster, lambda: ray.get([a.rss_bytes.remote() for a in cluster.actors])


def window_rss(samples: list, lo: float, hi: float) -> float:
    """Summed RSS of the shards, median over the samples taken in [lo, hi) seconds."""
    picked = [sum(rss) for t, rss in samples if lo <= t < hi]
    return float(np.median(picked))


def slope_per_min(samples: list, lo: float) -> float:
    """Least-squares slope (bytes a minute) of the shards' summed RSS over the samples from `lo` s."""
    picked = [(t, sum(rss)) for t, rss in samples if t >= lo]
    if len(picked) < 2:
        return 0.0
    t, total = np.array(picked, dtype=float).T
    return float(np.polyfit(t, total, 1)[0]) * 60


def percentile_ms(times: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(times, q)) if times else 0.0


SLOPE_LIMIT_MIB_PER_MIN = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the measured soak (10 min)")
    parser.add_argument("--settle-seconds", type=float, default=30.0, help="load before the measured soak")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows-per-table", type=int, default=50_000, help="ids each table's calls draw from")
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="interval of the RSS samples")
    parser.add_argument("--processes", action="store_true",
                        help="shards as plain local processes (bench/shard_processes.py), not Ray actors")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak")
    args = parser.parse_args()
    if args.seconds < 2 * WINDOW_S:
        parser.error(f"--seconds must be >= {2 * WINDOW_S:.0f} (two RSS windows of {WINDOW_S:.0f} s)")

    cluster, read_rss = start_shards(args.processes, args.shards)
    try:
        cfgs = tables(args.clients)
        rng = np.random.default_rng(0)
        id_sets = {cfg.name: np.sort(rng.choice(NUM_ROWS, args.rows_per_table, replace=False)) for cfg in cfgs}
        with cluster.client(client_id="soak-warm-up") as client:
            warm_up(client, cfgs, id_sets)
        samples: list = []
        stop = threading.Event()
        started = time.monotonic() + args.settle_seconds
        sampler = threading.Thread(target=sample_rss, args=(read_rss, started, stop, samples, args.sample_seconds),
                                   daemon=True)
        soak = Soak(cluster, cfgs, id_sets, started, started + args.seconds)
        logs = [ClientLog() for _ in range(args.clients)]
        threads = [threading.Thread(target=soak.run_client, args=(c, logs[c])) for c in range(args.clients)]
        sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        with cluster.client() as client:
            stats = client.report()
    finally:
        cluster.shutdown()

    fetch_s = [t for log in logs for t in log.fetch_s]
    step_s = [t for log in logs for t in log.step_s]
    stats_s = [t for log in logs for t in log.stats_s]
    errors = [e for log in logs for e in log.errors]
    first, last = window_rss(samples, 0, WINDOW_S), window_rss(samples, elapsed - WINDOW_S, elapsed + 1)
    slope_half = slope_per_min(samples, elapsed / 2)
    summary = {
        "requests": len(fetch_s) + len(step_s) + len(stats_s), "errors": len(errors),
        "rss_slope_last_half_mib_per_min": slope_half / 2**20,
        "passed": not errors and slope_half / 2**20 <= SLOPE_LIMIT_MIB_PER_MIN,
        "p99_ms": percentile_ms(fetch_s + step_s + stats_s, 99), "rss_growth": last / first - 1,
        "fetch_calls": len(fetch_s), "step_calls": len(step_s), "stats_calls": len(stats_s),
        "fetch_p50_ms": percentile_ms(fetch_s, 50), "fetch_p99_ms": percentile_ms(fetch_s, 99),
        "step_p50_ms": percentile_ms(step_s, 50), "step_p99_ms": percentile_ms(step_s, 99),
        "stats_p50_ms": percentile_ms(stats_s, 50),
        "calls_per_s": (len(fetch_s) + len(step_s) + len(stats_s)) / elapsed, "seconds": elapsed,
        "settle_seconds": args.settle_seconds, "clients": args.clients, "shards": args.shards,
        "shards_as": "local processes" if args.processes else "Ray actors (start_local)",
        "rows_per_table": args.rows_per_table,
        "rss_start_bytes": samples[0][1], "rss_end_bytes": samples[-1][1],
        "rss_first_window_bytes": first, "rss_last_window_bytes": last,
        "rss_slope_whole_run_mib_per_min": slope_per_min(samples, 0) / 2**20,
        "rss_series": [[round(t, 1), [int(b) for b in rss]] for t, rss in samples],
        "shard_rows": [sum(t.rows for t in s.tables) for s in stats.shards],
        "first_errors": errors[:5],
    }
    text = report(summary)
    write_results(args.out, text, summary)
    print(json.dumps(summary) if args.json else text)


def report(s: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    totals = [sum(rss) for _, rss in s["rss_series"]]
    lines = [
        f"# Soak: {s['clients']} clients x mixed traffic, {s['shards']} shards ({s['shards_as']}) on 127.0.0.1, "
        f"{s['seconds']:.0f} s measured after {s['settle_seconds']:.0f} s of the same load", "",
        f"Each call: a fetch of {FETCH_IDS} ids from the client's table and {FETCH_IDS} from the shared one (45%), "
        f"a training step (50%: a held fetch of {FETCH_IDS} ids for the next step, a push of {PUSH_IDS} ids as that "
        f"step, committed on every shard, a push of {PUSH_IDS} ids to the shared table, the held rows), or the "
        f"cluster's stats (5%); fp32 x {WIDTH}, ids drawn from {s['rows_per_table']:,} rows per table, all written "
        f"in the warm-up.", "",
        "| calls | calls/s | errors | p99 ms (all) | fetch p50 / p99 ms | step p50 / p99 ms | stats p50 ms |",
        "|---|---|---|---|---|---|---|",
        f"| {s['requests']:,} | {s['calls_per_s']:.1f} | {s['errors']} | {s['p99_ms']:.1f} | "
        f"{s['fetch_p50_ms']:.1f} / {s['fetch_p99_ms']:.1f} | {s['step_p50_ms']:.1f} / {s['step_p99_ms']:.1f} | "
        f"{s['stats_p50_ms']:.1f} |", "",
        "| shard RSS (RssAnon) | " + " | ".join(f"shard {i}" for i in range(s["shards"])) + " |",
        "|---|" + "---|" * s["shards"],
        "| at start | " + " | ".join(mib(b) for b in s["rss_start_bytes"]) + " |",
        "| at end | " + " | ".join(mib(b) for b in s["rss_end_bytes"]) + " |", "",
        f"**RSS slope over the last half ({s['seconds'] / 120:.1f} min): "
        f"{s['rss_slope_last_half_mib_per_min']:+.2f} MiB/min** (limit {SLOPE_LIMIT_MIB_PER_MIN:+.1f}); "
        f"over the whole run {s['rss_slope_whole_run_mib_per_min']:+.2f} MiB/min. Shards' summed RSS, median "
        f"of the first 10 s {mib(s['rss_first_window_bytes'])}, of the last 10 s {mib(s['rss_last_window_bytes'])} "
        f"({100 * s['rss_growth']:+.2f}%). Errors: {s['errors']} (limit 0). {'PASS' if s['passed'] else 'FAIL'}.", "",
        "Shards' summed RSS (MiB), one sample in 10: " + " ".join(f"{t / 2**20:.0f}" for t in totals[::10]),
    ]
    if s["first_errors"]:
        lines += ["", "First errors:", *(f"- {e}" for e in s["first_errors"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
