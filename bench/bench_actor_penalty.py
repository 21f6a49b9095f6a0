"""The Ray actor penalty: the same shard code serving the same fetch from a plain process and from a
Ray actor (issue 23, point 5).

One all-DRAM cold shard started by bench/shard_processes.py as a plain process and one started by
`launch()` as a Ray actor (the embedded cluster), both at the same CPU priority and with the same
malloc settings, each holding the same table (every row stored first). One client process (this
one) fetches from each in turn through MemoryClient: 16k distinct ids x fp32 64 (same-host path:
rows in a shared-memory file) and 1 id. The two servers are measured interleaved, run after run,
so a noisy minute hits both; each run's figure is the median time of `--repeats` fetches.

    python bench/bench_actor_penalty.py [--runs 5] [--repeats 40] [--niceness 19] [--out PATH]

Reports per case the median [min, max] over runs of each server's per-run median, and the ratio
actor / plain of the medians (the acceptance: <= 1.15 for the 16k fetch).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from memory_service.server.shard_process import SHARD_ENV, reexec_with  # noqa: E402

reexec_with(SHARD_ENV)  # the client handles the same large messages as a shard

from memory_service.cluster import ClusterConfig, launch  # noqa: E402
from memory_service.config import OptimizerConfig, TableConfig  # noqa: E402
from memory_service.ray_attach import init_local_ray  # noqa: E402
from report import write_results  # noqa: E402  (bench/report.py)
from shard_processes import start_processes  # noqa: E402

WIDTH = 64
ROWS = 262144
TABLE = TableConfig(name="bench", num_rows=ROWS, width=WIDTH, optimizer=OptimizerConfig(kind="sgd", lr=1e-3))


def fill(client) -> None:
    """Creates the table and stores every row (a zero gradient), so no fetch pays for lazy init."""
    client.create_table(TABLE)
    for start in range(0, ROWS, 65536):
        ids = np.arange(start, min(start + 65536, ROWS))
        client.push({"bench": (ids, np.zeros((len(ids), WIDTH), np.float32))}, step=1)


def median_ms(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, in ms (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def measure(clients: dict, cases: dict, runs: int, repeats: int) -> dict:
    """{(case, server): [per-run median ms]}, the servers interleaved within each run."""
    out: dict = {}
    for run in range(runs):
        for case, ids in cases.items():
            order = list(clients.items()) if run % 2 == 0 else list(reversed(clients.items()))
            for server, client in order:
                ms = median_ms(lambda: client.fetch({"bench": ids}), repeats)
                out.setdefault((case, server), []).append(ms)
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--niceness", type=int, default=19, help="both servers' CPU priority (start_local's: 19)")
    p.add_argument("--out", default="bench/results/actor_penalty")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = {"16k ids": rng.choice(ROWS, 16384, replace=False), "1 id": np.array([7])}
    init_local_ray()
    plain = start_processes(num_shards=1, num_hot=0, niceness=args.niceness)
    cluster = launch(ClusterConfig(num_shards=1, num_hot=0, niceness=args.niceness, name="actor-penalty"))
    try:
        with plain.client() as plain_client, cluster.client() as actor_client:
            clients = {"plain process": plain_client, "Ray actor": actor_client}
            for client in clients.values():
                fill(client)
            results = measure(clients, cases, args.runs, args.repeats)
    finally:
        cluster.shutdown()
        plain.shutdown()
    lines = [f"One all-DRAM shard, fp32 x {WIDTH}, table {ROWS:,} rows, niceness {args.niceness}; {args.runs} "
             f"interleaved runs x {args.repeats} fetches (each run's median ms; median [min, max] over runs)", "",
             "| fetch | plain process ms | Ray actor ms | actor / plain |", "|---|---|---|---|"]
    summary_json = {}
    for case in cases:
        plain_ms, actor_ms = results[(case, "plain process")], results[(case, "Ray actor")]
        ratios = [a / b for a, b in zip(actor_ms, plain_ms)]
        ratio = statistics.median(actor_ms) / statistics.median(plain_ms)
        lines.append(f"| {case} | {summary(plain_ms)} | {summary(actor_ms)} | {ratio:.2f} "
                     f"(per run {min(ratios):.2f}-{max(ratios):.2f}) |")
        summary_json[case] = {"plain_ms": plain_ms, "actor_ms": actor_ms, "ratio": ratio}
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text, summary_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
