"""What each compiled loop of memory_service/native/ gains over its numpy reference (the same
results, bit for bit: tests/memory_service/native/), on one batch of a training step: 16k distinct
rows x fp32 64 of a 128k-row table. Both paths run in the same process, interleaved; each figure
is the median of `--reps` calls, each run repeated `--runs` times (median and spread of the ratio).

    python bench/bench_store_kernels.py [--rows 16384] [--runs 3] [--reps 7]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from memory_service.config import OptimizerConfig
from memory_service.ids import SlotIndex
from memory_service.native import kernels
from memory_service.shard.request_checks import sum_duplicates
from memory_service.storage.optimizer import make_optimizer
from memory_service.storage.tiers.dram import DramTier
from report import write_results  # bench/report.py

WIDTH, SPREAD = 64, 8


def timed(fn, setup, reps: int) -> float:
    """Median seconds of fn(*setup()) over `reps` calls (setup untimed: fresh copies)."""
    times = []
    for _ in range(reps):
        args = setup()
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cases(n: int, rng: np.random.Generator) -> dict:
    """name -> (fn, setup): one batch of each loop."""
    table = n * SPREAD
    ids = np.sort(rng.choice(table, n, replace=False))
    index = SlotIndex()
    index.insert(np.arange(table), np.arange(table))
    arena = DramTier(WIDTH, 2 * WIDTH)
    arena.append(np.arange(table), rng.standard_normal((table, WIDTH), dtype=np.float32),
                 rng.standard_normal((table, 2 * WIDTH), dtype=np.float32), np.zeros(table, np.int64))
    slots = arena.lookup(ids)
    records = arena.records_at(slots)
    grads = (rng.standard_normal((n, WIDTH)) * 1e-3).astype(np.float32)
    dup_ids = rng.integers(0, n // 2, n)
    out = {"slot lookup": (index.lookup, lambda: (ids,)),
           "gather (rows, state, last)": (arena.records_at, lambda: (slots,)),
           "scatter (write_at)": (arena.write_at, lambda: (slots, *records)),
           "duplicate-id gradient sum": (sum_duplicates, lambda: (dup_ids, grads))}
    for kind in ("sgd", "adagrad", "sparse_adam", "adam"):
        opt = make_optimizer(OptimizerConfig(kind, lr=1e-2, beta1=0.9, beta2=0.95))
        sw = opt.state_width(WIDTH)
        m = (rng.standard_normal((n, WIDTH)) * 1e-4).astype(np.float32)
        state = np.abs(np.concatenate([m, m * m * 3], axis=1)[:, :sw]) if sw else np.zeros((n, 0), np.float32)
        rows = rng.standard_normal((n, WIDTH), dtype=np.float32) * np.float32(0.05)
        out[f"{kind} step"] = (opt.apply, lambda r=rows, s=state: (r.copy(), s.copy(), grads, 21, 1e-2))
        if kind == "adam":
            for step in range(1, 41):
                opt.record_step(step, 1e-2 * (1 + 0.5 * np.cos(step)))
            last = rng.integers(20, 40, n)
            out["adam catch-up (gaps 1-20)"] = (opt.catch_up, lambda r=rows, s=state: (r.copy(), s.copy(), last.copy(), 40))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store_kernels")
    args = parser.parse_args()
    assert kernels.active(), "the extension is not built (pip install -e . or setup.py build_ext --inplace)"
    rng = np.random.default_rng(0)
    batch = cases(args.rows, rng)
    results = {name: [] for name in batch}  # name -> [(numpy s, native s)] per run
    for _ in range(args.runs):
        for name, (fn, setup) in batch.items():
            with kernels.numpy_reference():
                reference = timed(fn, setup, args.reps)
            results[name].append((reference, timed(fn, setup, args.reps)))
    lines = [f"# Compiled loops against their numpy reference: {args.rows} rows x fp32 {WIDTH}, "
             f"median of {args.reps} calls, {args.runs} runs", "",
             "| loop | numpy ms | C ms | numpy / C, median | runs min-max |", "|---|---|---|---|---|"]
    summary = {}
    for name, pairs in results.items():
        ref, nat = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
        ratios = [r / c for r, c in pairs]
        summary[name] = {"numpy_ms": 1e3 * ref, "native_ms": 1e3 * nat, "ratios": ratios}
        lines.append(f"| {name} | {1e3 * ref:.2f} | {1e3 * nat:.2f} | {np.median(ratios):.1f}x | "
                     f"{min(ratios):.1f}-{max(ratios):.1f}x |")
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text, summary)


if __name__ == "__main__":
    main()
