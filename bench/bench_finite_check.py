"""What the finiteness check costs a push: TableStore.prepare_update computes a push's new rows and
optimizer state and checks them (`UpdateBatch.first_non_finite`: np.isfinite over the new rows and
state) before anything is stored, so an update that would leave a value non-finite is refused.

For each optimizer, per step: the whole update (prepare + write, `TableStore.update`) of `ids`
distinct rows x 64 fp32, and the check alone on the same prepared batch, timed in the same run.
The update's rows are drawn from a table of `ids x spread` rows, so dense `adam` catches most rows
up over the steps they skipped (its usual cost). Reports the median and spread (min..max over
repeats of the per-repeat medians) of the check's share of the update.

    python bench/bench_finite_check.py [--ids 16384] [--steps 12] [--repeats 3] [--out bench/results/finite_check]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_table_optimizer import WIDTH, table, workload  # noqa: E402  (bench/)
from memory_service.storage.store import TableStore  # noqa: E402
from report import write_results  # noqa: E402  (bench/report.py)

KINDS = ("adam", "sparse_adam", "adagrad", "sgd")


def one_repeat(kind: str, args, seed: int) -> tuple[float, float]:
    """(median update ms, median check ms) over the measured steps of one fresh store."""
    store = TableStore(table(kind, args.ids * args.spread))
    updates, checks = [], []
    for step, (ids, grads) in enumerate(workload(args.ids, args.spread, args.warmup + args.steps, seed), 1):
        start = time.perf_counter()
        update = store.prepare_update(ids, grads, step, 1e-2)
        store.write_update(update)
        took = time.perf_counter() - start
        start = time.perf_counter()
        assert update.batch.first_non_finite() is None
        check = time.perf_counter() - start
        if step > args.warmup:
            updates.append(took * 1e3)
            checks.append(check * 1e3)
    return statistics.median(updates), statistics.median(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=16384)
    parser.add_argument("--spread", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/finite_check")
    args = parser.parse_args()
    lines = [f"# Finiteness check of a push ({args.ids} ids x {WIDTH} fp32, {args.steps} steps x "
             f"{args.repeats} repeats, store alone)", "",
             "| optimizer | update ms (median) | check ms (median) | check / update: median (min..max) |",
             "|---|---|---|---|"]
    summary = {}
    for kind in KINDS:
        runs = [one_repeat(kind, args, seed) for seed in range(args.repeats)]
        shares = [check / update for update, check in runs]
        update = statistics.median(u for u, _ in runs)
        check = statistics.median(c for _, c in runs)
        summary[kind] = {"update_ms": update, "check_ms": check, "share": statistics.median(shares),
                         "share_min": min(shares), "share_max": max(shares)}
        lines.append(f"| {kind} | {update:.2f} | {check:.2f} | {100 * statistics.median(shares):.1f}% "
                     f"({100 * min(shares):.1f}..{100 * max(shares):.1f}%) |")
        print(lines[-1], flush=True)
    write_results(args.out, "\n".join(lines), summary)


if __name__ == "__main__":
    main()
