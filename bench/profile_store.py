"""Where a shard's store spends a training step: fetch + push of 16k distinct rows x fp32 64
(`bench_table_optimizer`'s workload) through one TableStore, profiled with cProfile and split per
stage, on the numpy reference paths and on the compiled loops (memory_service/native/) in the same
run. The store alone: request decode, gRPC and encode are the service's (bench/profile_service.py).
Times are the process's CPU time (time.process_time), not wall time: on a shared machine a wall
clock charges the time the process waited for a core to whatever line it waited in.

    python bench/profile_store.py [--ids 16384] [--steps 20] [--kinds sparse_adam adam]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import numpy as np

from bench_table_optimizer import table, workload
from memory_service.native import kernels
from memory_service.storage.store import TableStore
from report import write_results  # bench/report.py

# stage -> (file suffix or "", function names): the first stage that matches a profiled function
# takes its own time (tottime); "other" takes the rest (Python glue, small numpy calls).
STAGES = {
    "slot lookup": ("ids.py", {"lookup", "_find", "_home", "index_lookup"}),
    "dedup / sort": ("", {"sorted_unique", "unique", "_unique1d", "_unique_hash", "sort", "argsort"}),
    "catch-up (dense adam)": ("catch_up.py", None),
    "catch-up kernels": ("", {"adam_row_stats", "adam_catch_up_series"}),
    "optimizer step": ("optimizer.py", {"apply", "_fused_add"}),
    "optimizer kernels": ("", {"sgd", "adagrad", "sparse_adam", "adam"}),
    "initial rows (Philox)": ("rows.py", None),
    "gather / scatter": ("", {"records_at", "rows_at", "write_at", "last_at", "gather", "scatter", "take",
                              "copy", "concatenate"}),
    "finite check": ("", {"first_non_finite", "all_finite", "isfinite"}),
}


def stage_of(file: str, name: str) -> str:
    for stage, (suffix, names) in STAGES.items():
        if (not suffix or file.endswith(suffix)) and (names is None or name in names):
            return stage
    return "other"


def profile(kind: str, args) -> tuple[float, dict[str, float]]:
    """(median CPU ms per step, {stage: CPU ms per step}) of read + update through one store."""
    store = TableStore(table(kind, args.ids * args.spread))
    steps = list(workload(args.ids, args.spread, args.warmup + args.steps))
    profiler, times = cProfile.Profile(time.process_time), []
    for step, (ids, grads) in enumerate(steps, 1):
        timed = step > args.warmup
        start = time.process_time()
        if timed:
            profiler.enable()
        store.read(ids)
        store.update(ids, grads, step, lr=1e-2)
        if timed:
            profiler.disable()
            times.append(time.process_time() - start)
    split: dict[str, float] = {}
    for (file, _, name), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        name = name.strip("<>").split(" of ")[0].replace("method '", "").replace("built-in method ", "").strip("'")
        name = name.split(".")[-1]
        stage = stage_of(file, name)
        split[stage] = split.get(stage, 0.0) + 1e3 * own / args.steps
    return 1e3 * float(np.median(times)), split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=16384)
    parser.add_argument("--spread", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kinds", nargs="+", default=["sparse_adam", "adam"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_store")
    args = parser.parse_args()
    cells = {}
    for kind in args.kinds:
        with kernels.numpy_reference():
            cells[(kind, "numpy (before)")] = profile(kind, args)
        cells[(kind, "C kernels (after)")] = profile(kind, args)
    stages = [*STAGES, "other"]
    head = [f"{kind}, {path}" for kind, path in cells]
    lines = [f"# Store alone, one step = read + update of {args.ids} distinct rows x fp32 64 (table of "
             f"{args.ids * args.spread} rows), CPU ms per step by stage (cProfile own time, {args.steps} steps "
             f"after {args.warmup} warm-up; profiling adds overhead, the median step is beside it)", "",
             "| stage | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(f"{split.get(stage, 0.0):.2f}" for _, split in cells.values()) + " |")
    lines.append("| **sum (profiled)** | " + " | ".join(f"{sum(s.values()):.2f}" for _, s in cells.values()) + " |")
    lines.append("| **median step (CPU ms)** | " + " | ".join(f"{ms:.2f}" for ms, _ in cells.values()) + " |")
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text)


if __name__ == "__main__":
    main()
