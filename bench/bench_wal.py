"""What crash recovery costs a cold shard's pushes: the write-ahead log on, off, and fsynced.

One in-process cold shard (LMDB in a temp dir, the DRAM budget holding `--resident` of the
table's rows) takes the same pushes of `--request` distinct ids x `--width` fp32 sparse-Adam
gradients three ways, in alternating rounds, each figure the best round:

- no_wal: StorageConfig(wal=False), what a cold shard did before crash recovery (the baseline);
- wal: every push's after-images (row, optimizer state, last step: 3 x width x 4 + 8 bytes per
  row, about 3x the gradient's bytes) appended to the log and handed to the OS before it returns;
- wal_fsync: the same, forced to disk per push (StorageConfig.wal_fsync).

Printed: pushes/s and rows/s of each, the ratios wal / no_wal and wal_fsync / no_wal, and the
log bytes written per pushed row. Also a restart: rows replayed per second when a shard reopens
with the whole run still in its log (no flush since start); and how long a checkpoint (dirty rows
to LMDB, LMDB synced, a new log) takes (in 1024-row chunks, the lock released between them).

    python bench/bench_wal.py [--rows 1000000] [--request 16384] [--width 64] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig  # noqa: E402
from memory_service.shard.shard import Shard  # noqa: E402
from memory_service.tables import TablePush

MODES = {"no_wal": dict(wal=False), "wal": dict(wal=True), "wal_fsync": dict(wal=True, wal_fsync=True)}


def open_shard(path: str, args, **kw) -> Shard:
    budget = args.resident * (16 + 1 + 12 * args.width) * 2  # rows + state + index, roughly
    shard = Shard(0, 1, StorageConfig(path=path, dram_budget_bytes=budget, flush_interval_s=3600,
                                      flush_wal_bytes=1 << 40, **kw))
    shard.create_table(TableConfig("t", args.rows, args.width, optimizer=OptimizerConfig("sparse_adam")))
    return shard


def pushes(args, rng: np.random.Generator) -> list[TablePush]:
    return [TablePush(step, rng.choice(args.rows, args.request, replace=False),
                      rng.standard_normal((args.request, args.width)).astype(np.float32))
            for step in range(1, args.pushes + 1)]


def time_round(path: str, args, batch: list[TablePush], crash: bool, **kw) -> tuple[float, int, float]:
    """Seconds for the pushes on a fresh shard, the log bytes they wrote, and the seconds of the
    checkpoint that writes the dirty rows to LMDB and empties the log (0 with `crash`: the shard
    is abandoned without one, as a killed process leaves it, its log kept for a replay)."""
    shard = open_shard(path, args, **kw)
    checkpoint = 0.0
    try:
        start = time.perf_counter()
        for push in batch:
            shard.push("bench", {"t": push}, request_seq=push.step)
        seconds = time.perf_counter() - start
        log_bytes = shard.journal.wal.nbytes if shard.journal.durable else 0
        if not crash:
            start = time.perf_counter()
            shard.flush()
            checkpoint = time.perf_counter() - start
    finally:
        if crash:  # what a killed process leaves: no flush (private parts: nothing else abandons a shard)
            shard.placer.stop()
            shard.journal.close()
            shard._tables.disk.close()
        else:
            shard.close()
    return seconds, log_bytes, checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--request", type=int, default=16384)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--resident", type=int, default=65536, help="rows the DRAM budget holds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    batch = pushes(args, np.random.default_rng(0))
    best = {mode: float("inf") for mode in MODES}
    log_bytes, replay, checkpoint = 0, float("inf"), float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode, kw in MODES.items():
                path = f"{tmp}/{mode}-{r}"
                crash = mode == "wal"
                seconds, written, flushed = time_round(path, args, batch, crash, **kw)
                best[mode] = min(best[mode], seconds)
                if mode == "wal_fsync":
                    checkpoint = min(checkpoint, flushed)
                if crash:
                    log_bytes = written
                    start = time.perf_counter()
                    reopened = Shard(0, 1, StorageConfig(path=path, dram_budget_bytes=1 << 20))
                    replay = min(replay, time.perf_counter() - start)
                    reopened.close()
    rows = args.pushes * args.request
    result = {f"{mode}_rows_per_s": rows / seconds for mode, seconds in best.items()}
    result.update(wal_vs_no_wal=best["no_wal"] / best["wal"], wal_fsync_vs_no_wal=best["no_wal"] / best["wal_fsync"],
                  log_bytes_per_row=log_bytes / rows, gradient_bytes_per_row=4 * args.width,
                  replay_rows_per_s=rows / replay, checkpoint_s=checkpoint)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{args.pushes} pushes of {args.request} rows x {args.width} fp32 (sparse Adam), {args.rows} rows, "
          f"{args.resident} resident; best of {args.rounds} rounds")
    for mode, seconds in best.items():
        print(f"  {mode:10s} {rows / seconds / 1e6:6.2f} M rows/s  ({args.pushes / seconds:6.1f} pushes/s)")
    print(f"  wal / no_wal: {result['wal_vs_no_wal']:.2f}x   wal_fsync / no_wal: {result['wal_fsync_vs_no_wal']:.2f}x")
    print(f"  log: {result['log_bytes_per_row']:.0f} bytes per pushed row (the gradient: "
          f"{result['gradient_bytes_per_row']} bytes)")
    print(f"  restart with the whole run in the log: {result['replay_rows_per_s'] / 1e6:.2f} M rows/s replayed "
          f"(reopen time: LMDB open, replay, the checkpoint after it)")
    print(f"  checkpoint of the dirty rows ({args.resident} resident at most), fsynced: {checkpoint * 1e3:.0f} ms "
          f"(in chunks: bench/bench_flush_latency.py measures what fetches see meanwhile)")


if __name__ == "__main__":
    main()
