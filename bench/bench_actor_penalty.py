"""The Ray actor penalty: the same shard code serving the same fetch from a plain process and from a
Ray actor (issue 23, point 5).

One all-DRAM cold shard started by bench/shard_processes.py as a plain process and one started by
`launch()` as a Ray actor (the embedded cluster), both at the same CPU priority and with the same
malloc settings, each holding the same table (every row stored first). One client process (this
one) fetches from each in turn through MemoryClient with Fetch rpcs (direct_reads=False: a direct
read never reaches the server, so it would time the client alone): 16k distinct ids x fp32 64
(same-host path: rows in a shared-memory reply file) and 1 id. The two servers are measured interleaved, run after run,
so a noisy minute hits both; each run's figure is the median time of `--repeats` fetches.

    python bench/bench_actor_penalty.py [--runs 5] [--repeats 40] [--niceness 19] [--out PATH]

Reports per case the median [min, max] over runs of each server's per-run median, and the ratio
actor / plain of the medians (the acceptance: <= 1.15 for the 16k fetch).
"""
from __future__ import annotations

import argparse
import os
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
import ray  # noqa: E402
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


def process_counters(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, voluntary, involuntary context switches) of a process so far, all threads."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, switches = 0.0, [0, 0]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            status = (task / "status").read_text()
        except OSError:  # the thread ended
            continue
        cpu += (int(fields[11]) + int(fields[12])) / tick
        for k, key in enumerate(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            switches[k] += int(status.split(key + ":")[1].split()[0])
    return cpu, switches[0], switches[1]


def idle_cpu(pids: dict, seconds: float) -> dict[str, float]:
    """CPU ms per second of wall of each server process and of Ray's other processes (every other
    descendant of this driver: GCS, raylet, dashboard, monitors, idle workers) while nobody sends
    anything: the background load each way of serving puts on the machine."""
    def ray_pids() -> list[int]:
        parents = {}
        for entry in Path("/proc").iterdir():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (ValueError, OSError):  # not a process, or it ended
                continue
        ours, grew = {os.getpid()}, True
        while grew:
            new = {pid for pid, parent in parents.items() if parent in ours} - ours
            ours |= new
            grew = bool(new)
        return sorted(ours - {os.getpid(), *pids.values()})

    def cpu_of(pid_list: list[int]) -> float:
        total = 0.0
        for pid in pid_list:
            try:
                total += process_counters(pid)[0]
            except OSError:  # it ended
                pass
        return total

    others = ray_pids()
    before = {**{k: process_counters(p)[0] for k, p in pids.items()}, "Ray's other processes": cpu_of(others)}
    time.sleep(seconds)
    after = {**{k: process_counters(p)[0] for k, p in pids.items()}, "Ray's other processes": cpu_of(others)}
    return {k: 1e3 * (after[k] - before[k]) / seconds for k in before}


def measure(clients: dict, pids: dict, cases: dict, runs: int, repeats: int) -> tuple[dict, dict]:
    """({(case, server): [per-run median ms]}, {(case, server): [per-run (server CPU ms,
    context switches) per fetch]}), the servers interleaved within each run."""
    out: dict = {}
    costs: dict = {}
    for run in range(runs):
        for case, ids in cases.items():
            order = list(clients.items()) if run % 2 == 0 else list(reversed(clients.items()))
            for server, client in order:
                before = process_counters(pids[server])
                ms = median_ms(lambda: client.fetch({"bench": ids}), repeats)
                after = process_counters(pids[server])
                calls = repeats + 5
                out.setdefault((case, server), []).append(ms)
                costs.setdefault((case, server), []).append(
                    (1e3 * (after[0] - before[0]) / calls, (after[1] + after[2] - before[1] - before[2]) / calls))
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    return out, costs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--niceness", type=int, default=19, help="both servers' CPU priority (start_local's: 19)")
    p.add_argument("--idle-s", type=float, default=10.0, help="the idle window for background CPU")
    p.add_argument("--out", default="bench/results/actor_penalty")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = {"16k ids": rng.choice(ROWS, 16384, replace=False), "1 id": np.array([7])}
    init_local_ray()
    plain = start_processes(num_shards=1, num_hot=0, niceness=args.niceness)
    cluster = launch(ClusterConfig(num_shards=1, num_hot=0, niceness=args.niceness, name="actor-penalty"))
    try:
        with plain.client(direct_reads=False) as plain_client, cluster.client(direct_reads=False) as actor_client:
            clients = {"plain process": plain_client, "Ray actor": actor_client}
            for client in clients.values():
                fill(client)
            pids = {"plain process": plain.pids[0], "Ray actor": ray.get(cluster.actors[0].pid.remote())}
            background = idle_cpu(pids, args.idle_s)
            results, costs = measure(clients, pids, cases, args.runs, args.repeats)
    finally:
        cluster.shutdown()
        plain.shutdown()
    load = os.getloadavg()[0]
    lines = [f"`python bench/bench_actor_penalty.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f} on {os.cpu_count()} cores)", "",
             f"One all-DRAM shard, fp32 x {WIDTH}, table {ROWS:,} rows, niceness {args.niceness}; {args.runs} "
             f"interleaved runs x {args.repeats} fetches (each run's median ms; median [min, max] over runs)", "",
             "| fetch | plain process ms | Ray actor ms | actor / plain | server CPU ms per fetch, plain / actor "
             "| server context switches per fetch, plain / actor |", "|---|---|---|---|---|---|"]
    summary_json = {}
    for case in cases:
        plain_ms, actor_ms = results[(case, "plain process")], results[(case, "Ray actor")]
        ratios = [a / b for a, b in zip(actor_ms, plain_ms)]
        ratio = statistics.median(actor_ms) / statistics.median(plain_ms)
        cpu = [statistics.median(c[0] for c in costs[(case, server)]) for server in ("plain process", "Ray actor")]
        switches = [statistics.median(c[1] for c in costs[(case, server)]) for server in ("plain process", "Ray actor")]
        lines.append(f"| {case} | {summary(plain_ms)} | {summary(actor_ms)} | {ratio:.2f} "
                     f"(per run {min(ratios):.2f}-{max(ratios):.2f}) | {cpu[0]:.2f} / {cpu[1]:.2f} | "
                     f"{switches[0]:.1f} / {switches[1]:.1f} |")
        summary_json[case] = {"plain_ms": plain_ms, "actor_ms": actor_ms, "ratio": ratio,
                              "server_cpu_ms": cpu, "server_switches": switches}
    lines += ["", f"Background CPU with no request in flight ({args.idle_s:g} s window): "
              + ", ".join(f"{k} {v:.1f} ms/s" for k, v in background.items())]
    summary_json["background_cpu_ms_per_s"] = background
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text, summary_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
