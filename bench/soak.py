"""Soak: 8 concurrent clients of mixed fetch and push against 2 shards on 127.0.0.1 for a bounded
time, counting errors and watching the shards' memory.

A real local Ray cluster (memory_service.cluster.start_local, 2 cold shards, no hot one) serves
one table per client and one table all clients share. Each client is a thread with a MemoryClient
of its own. Before the clock starts a warm-up writes every row the soak will touch (a push over
each table's id set), so rows created lazily on first write do not count as growth; then each
client, until the time is up, either fetches 1024 ids of its table and of the shared one (half its
calls) or pushes gradients for 512 ids of each. Pushes are valid under concurrency by design:
a client's own table gets that client's steps in order (1, 2, 3, ... : dense Adam tables take
nothing else), and the shared table, a sparse_adam one (any step order), gets steps drawn from one
counter all clients share, so no step is pushed twice.

The clients first run the same load for `--settle-seconds` (10) unmeasured: the first window
would otherwise hold what the warm-up's large pushes left in the shards' allocators (measured here:
a 20 s run without it fell from 619 to 407 MiB, a "growth" of -34% that would hide a leak). Errors
count from the start.

Memory: every second each shard's anonymous RSS (ShardActor.rss_bytes, RssAnon); `rss_growth` is
the shards' summed median RSS over the last 10 s over that of the first 10 s, minus 1 (a
fraction). Acceptance: 0 errors and rss_growth < 0.05.

    python bench/soak.py [--seconds 60] [--settle-seconds 10] [--clients 8] [--json]

Writes bench/results/soak.md and .json; with --json prints only the JSON object, with `requests`,
`errors`, `p99_ms` and `rss_growth`.
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
    push_s: list[float] = field(default_factory=list)
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
                fetch = rng.random() < 0.5
                measured = time.monotonic() >= self.measure_from
                try:
                    start = time.perf_counter()
                    if fetch:
                        client.fetch({own: rng.choice(self.id_sets[own], FETCH_IDS),
                                      shared: rng.choice(self.id_sets[shared], FETCH_IDS)})
                        if measured:
                            log.fetch_s.append(time.perf_counter() - start)
                    else:
                        ids = rng.choice(self.id_sets[own], PUSH_IDS)
                        grads = rng.standard_normal((PUSH_IDS, WIDTH)).astype(np.float32)
                        client.push({own: (ids, grads)}, step=step + 1)  # this client's own steps, in order
                        step += 1
                        shared_ids = rng.choice(self.id_sets[shared], PUSH_IDS)
                        client.push({shared: (shared_ids, grads)}, step=self.next_shared_step())
                        if measured:
                            log.push_s.append(time.perf_counter() - start)
                except Exception as err:  # counted and shown: the acceptance is zero of them
                    log.errors.append(f"client {c}: {type(err).__name__}: {err}")


def sample_rss(actors, start: float, stop: threading.Event, samples: list, interval_s: float = 1.0) -> None:
    """(seconds since `start` (monotonic), [RssAnon of each shard]) every `interval_s` from
    `start` until `stop`."""
    stop.wait(max(0.0, start - time.monotonic()))
    while not stop.is_set():
        samples.append((time.monotonic() - start, ray.get([a.rss_bytes.remote() for a in actors])))
        stop.wait(interval_s)


def window_rss(samples: list, lo: float, hi: float) -> float:
    """Summed RSS of the shards, median over the samples taken in [lo, hi) seconds."""
    picked = [sum(rss) for t, rss in samples if lo <= t < hi]
    return float(np.median(picked))


def percentile_ms(times: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(times, q)) if times else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the measured soak")
    parser.add_argument("--settle-seconds", type=float, default=10.0, help="load before the measured soak")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows-per-table", type=int, default=50_000, help="ids each table's calls draw from")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak")
    args = parser.parse_args()
    if args.seconds < 2 * WINDOW_S:
        parser.error(f"--seconds must be >= {2 * WINDOW_S:.0f} (two RSS windows of {WINDOW_S:.0f} s)")

    cluster = start_local(num_shards=args.shards, num_hot=0, name="soak")
    try:
        cfgs = tables(args.clients)
        rng = np.random.default_rng(0)
        id_sets = {cfg.name: np.sort(rng.choice(NUM_ROWS, args.rows_per_table, replace=False)) for cfg in cfgs}
        with cluster.client(client_id="soak-warm-up") as client:
            warm_up(client, cfgs, id_sets)
        samples: list = []
        stop = threading.Event()
        started = time.monotonic() + args.settle_seconds
        sampler = threading.Thread(target=sample_rss, args=(cluster.actors, started, stop, samples), daemon=True)
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
    push_s = [t for log in logs for t in log.push_s]
    errors = [e for log in logs for e in log.errors]
    first, last = window_rss(samples, 0, WINDOW_S), window_rss(samples, elapsed - WINDOW_S, elapsed + 1)
    # a leak climbs steadily; an allocator reaching a new high-water mark steps up and stays
    times, totals = np.array([t for t, _ in samples]), np.array([sum(rss) for _, rss in samples], float)
    slope = float(np.polyfit(times, totals, 1)[0]) * 60 if len(samples) > 1 else 0.0  # bytes per minute
    summary = {
        "requests": len(fetch_s) + len(push_s), "errors": len(errors),
        "p99_ms": percentile_ms(fetch_s + push_s, 99), "rss_growth": last / first - 1,
        "fetch_calls": len(fetch_s), "push_calls": len(push_s),
        "fetch_p50_ms": percentile_ms(fetch_s, 50), "fetch_p99_ms": percentile_ms(fetch_s, 99),
        "push_p50_ms": percentile_ms(push_s, 50), "push_p99_ms": percentile_ms(push_s, 99),
        "calls_per_s": (len(fetch_s) + len(push_s)) / elapsed, "seconds": elapsed,
        "settle_seconds": args.settle_seconds, "clients": args.clients, "shards": args.shards,
        "rows_per_table": args.rows_per_table,
        "rss_start_bytes": samples[0][1], "rss_end_bytes": samples[-1][1],
        "rss_first_window_bytes": first, "rss_last_window_bytes": last, "rss_slope_bytes_per_min": slope,
        "rss_series": [[round(t, 1), int(total)] for t, total in zip(times, totals)],
        "shard_rows": [sum(t.rows for t in s.tables) for s in stats.shards],
        "first_errors": errors[:5],
    }
    text = report(summary)
    write_results(args.out, text, summary)
    print(json.dumps(summary) if args.json else text)


def report(s: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    ok = s["errors"] == 0 and s["rss_growth"] < 0.05
    lines = [
        f"# Soak: {s['clients']} clients x mixed fetch/push, {s['shards']} shards on 127.0.0.1, "
        f"{s['seconds']:.0f} s measured after {s['settle_seconds']:.0f} s of the same load", "",
        f"Each call: a fetch of {FETCH_IDS} ids from the client's table and {FETCH_IDS} from the shared one, "
        f"or a push of {PUSH_IDS} ids to each (fp32 x {WIDTH}); ids drawn from {s['rows_per_table']:,} rows per "
        f"table, all written in the warm-up.", "",
        "| calls | calls/s | errors | p99 ms (all) | fetch p50 / p99 ms | push p50 / p99 ms |",
        "|---|---|---|---|---|---|",
        f"| {s['requests']:,} | {s['calls_per_s']:.1f} | {s['errors']} | {s['p99_ms']:.1f} | "
        f"{s['fetch_p50_ms']:.1f} / {s['fetch_p99_ms']:.1f} | {s['push_p50_ms']:.1f} / {s['push_p99_ms']:.1f} |", "",
        "| shard RSS (RssAnon) | " + " | ".join(f"shard {i}" for i in range(s["shards"])) + " |",
        "|---|" + "---|" * s["shards"],
        "| at start | " + " | ".join(mib(b) for b in s["rss_start_bytes"]) + " |",
        "| at end | " + " | ".join(mib(b) for b in s["rss_end_bytes"]) + " |", "",
        f"RSS of both shards, median of the first 10 s {mib(s['rss_first_window_bytes'])}, of the last 10 s "
        f"{mib(s['rss_last_window_bytes'])}: growth {100 * s['rss_growth']:+.2f}% (limit +5%); least-squares "
        f"slope over the run {s['rss_slope_bytes_per_min'] / 2**20:+.1f} MiB/min. "
        f"Errors: {s['errors']} (limit 0). {'PASS' if ok else 'FAIL'}.", "",
        "Both shards' RSS each second (MiB): " + " ".join(f"{total / 2**20:.0f}" for _, total in s["rss_series"]),
    ]
    if s["first_errors"]:
        lines += ["", "First errors:", *(f"- {e}" for e in s["first_errors"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
