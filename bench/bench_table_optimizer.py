"""Cost of dense-equivalent Adam (`adam`) against lazy sparse Adam (`sparse_adam`) on the tables.

Each step a trainer fetches `ids` distinct rows and pushes their gradients (the headline cell of
bench_fetch: 16k ids, fp32 x 64, 2 shards, one client). Ids are drawn uniformly from a table of
`ids x spread` rows, so a row comes back after `spread` steps on average (geometric gaps, a tail
past 100 steps): under `adam` nearly every fetched row must first be caught up over the steps it
skipped, the worst case for its cost. Work per step: ids x 64 values read, caught up and updated;
bytes on the wire: ids x (64 x 4 + 8) each way. Baseline: the same steps with `sparse_adam`, in
the same script. Also the store alone (no RPC), to show where the time goes, on the compiled
loops (memory_service/native/) and on their numpy reference (the same results, bit for bit): the
store's floor before and after. Each cell runs `--runs` times (fresh table, cluster); the table
gives the median over runs of each run's median step, and the runs' spread (min-max).

    python bench/bench_table_optimizer.py [--ids 16384] [--spread 8] [--steps 30] [--runs 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from memory_service.server.shard_process import SHARD_ENV, reexec_with

reexec_with(SHARD_ENV)

from memory_service.cluster import ClusterConfig, launch  # noqa: E402
from memory_service.ray_attach import init_local_ray  # noqa: E402
from memory_service.config import OptimizerConfig, TableConfig  # noqa: E402
from memory_service.native import kernels  # noqa: E402
from memory_service.storage.store import TableStore  # noqa: E402
from report import write_results  # noqa: E402  (bench/report.py)

WIDTH = 64
KINDS = ("sparse_adam", "adam")


def workload(num_ids: int, spread: int, steps: int, seed: int = 0):
    """Per step: (distinct ids (n,), grads (n, WIDTH) float32 at a typical scale of 1e-3)."""
    rng = np.random.default_rng(seed)
    num_rows = num_ids * spread
    for _ in range(steps):
        ids = np.sort(rng.choice(num_rows, num_ids, replace=False))
        yield ids, (rng.standard_normal((num_ids, WIDTH)) * 1e-3).astype(np.float32)


def table(kind: str, num_rows: int) -> TableConfig:
    return TableConfig(f"bench-{kind}", num_rows, WIDTH, init_scale=0.05, seed=1,
                       optimizer=OptimizerConfig(kind, lr=1e-2, beta1=0.9, beta2=0.95))


def run_store(kind: str, args, native: bool = True) -> dict:
    """Read + update through one TableStore: the optimizer math without RPC (`native` False: on
    the numpy reference paths)."""
    if not native:
        with kernels.numpy_reference():
            cell = run_store(kind, args)
        return {**cell, "path": "store, numpy reference"}
    store = TableStore(table(kind, args.ids * args.spread))
    times = []
    for step, (ids, grads) in enumerate(workload(args.ids, args.spread, args.warmup + args.steps), 1):
        start = time.perf_counter()
        store.read(ids)
        store.update(ids, grads, step, lr=1e-2)
        if step > args.warmup:
            times.append(time.perf_counter() - start)
    stats = getattr(store.optimizer, "stats", None)
    return {"path": "store" if kernels.active() else "store, numpy reference", "kind": kind, "step_ms": 1e3 * float(np.median(times)),
            "rows_per_s": args.ids / float(np.median(times)),
            "loop_fraction": stats.loop_elements / max(1, stats.loop_elements + stats.series_elements)
            if stats else 0.0}


def run_service(kind: str, args) -> dict:
    """Fetch + push per step through a cluster of `--shards` shard actors."""
    cluster = launch(ClusterConfig(num_shards=args.shards, name=f"bench-opt-{kind}"))
    cfg = table(kind, args.ids * args.spread)
    fetch_t, push_t = [], []
    try:
        with cluster.client() as client:
            client.create_table(cfg)
            for step, (ids, grads) in enumerate(workload(args.ids, args.spread, args.warmup + args.steps), 1):
                t0 = time.perf_counter()
                client.fetch({cfg.name: ids})
                t1 = time.perf_counter()
                client.push({cfg.name: (ids, grads)}, step=step, lr=1e-2)
                t2 = time.perf_counter()
                if step > args.warmup:
                    fetch_t.append(t1 - t0)
                    push_t.append(t2 - t1)
            processed = sum(t.optimizer_rows for s in client.stats() for t in s.tables)
    finally:
        cluster.shutdown()
    step_s = float(np.median(np.add(fetch_t, push_t)))
    return {"path": f"service, {args.shards} shards", "kind": kind, "step_ms": 1e3 * step_s,
            "fetch_ms": 1e3 * float(np.median(fetch_t)), "push_ms": 1e3 * float(np.median(push_t)),
            "rows_per_s": args.ids / step_s,
            "optimizer_rows_per_step": processed / (args.warmup + args.steps)}


def repeated(run, runs: int) -> dict:
    """A cell run `runs` times: the median run's figures (by step_ms), each run's step_ms, spread."""
    cells = sorted((run() for _ in range(runs)), key=lambda c: c["step_ms"])
    steps = [c["step_ms"] for c in cells]
    return {**cells[len(cells) // 2], "step_ms": float(np.median(steps)), "runs_ms": steps,
            "rows_per_s": cells[0]["rows_per_s"] * steps[0] / float(np.median(steps))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=16384)
    parser.add_argument("--spread", type=int, default=8, help="table rows / ids: mean steps between a row's reads")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (rows get written and gaps grow)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median and spread)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "table_optimizer")
    args = parser.parse_args()
    init_local_ray()
    cells = ([repeated(lambda k=kind: run_store(k, args, native=False), args.runs) for kind in KINDS]
             + [repeated(lambda k=kind: run_store(k, args), args.runs) for kind in KINDS]
             + [repeated(lambda k=kind: run_service(k, args), args.runs) for kind in KINDS])
    by = {(c["path"], c["kind"]): c for c in cells}
    lines = [f"# Table optimizer cost: {args.ids} distinct ids x fp32 {WIDTH} per step, table of "
             f"{args.ids * args.spread} rows (a row returns every ~{args.spread} steps), "
             f"{args.warmup} warm-up + {args.steps} timed steps, median of {args.runs} runs", "",
             "| path | optimizer | ms per fetch+push (store: read+update), median | runs min-max | rows/s | "
             "adam / sparse_adam time | store floor / this |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        base = by[(c["path"], "sparse_adam")]["step_ms"]
        floor = by[("store", c["kind"])]["step_ms"]
        lines.append(f"| {c['path']} | {c['kind']} | {c['step_ms']:.1f} | {min(c['runs_ms']):.1f}-"
                     f"{max(c['runs_ms']):.1f} | {c['rows_per_s'] / 1e6:.2f} M | {c['step_ms'] / base:.2f}x | "
                     f"{floor / c['step_ms']:.2f} |")
    service = f"service, {args.shards} shards"
    ratio = by[(service, "adam")]["step_ms"] / by[(service, sparse := "sparse_adam")]["step_ms"]
    gain = {k: by[("store, numpy reference", k)]["step_ms"] / by[("store", k)]["step_ms"] for k in KINDS}
    summary = {"ids": args.ids, "spread": args.spread, "shards": args.shards, "runs": args.runs, "cells": cells,
               "store_numpy_over_native": gain,
               "adam_over_sparse_adam_service": ratio,
               "adam_over_sparse_adam_store": by[("store", "adam")]["step_ms"] / by[("store", sparse)]["step_ms"]}
    lines += ["", f"Headline (service, fetch + push): adam costs {ratio:.2f}x sparse_adam's time "
              f"(target <= 1.5x); {by[(service, 'adam')]['step_ms']:.1f} ms per step (target <= 8 ms), of which "
              f"the store alone takes {by[('store', 'adam')]['step_ms']:.1f} ms.",
              "Compiled loops against their numpy reference, store alone: "
              + ", ".join(f"{k} {g:.2f}x faster" for k, g in gain.items()) + "."]
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text, summary if args.json else None)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
