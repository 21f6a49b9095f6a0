"""The write-ahead log against writing every push straight through LMDB (issue 22).

One in-process cold shard (LMDB in a temp dir, the DRAM budget holding `--resident` rows) takes
`--pushes` pushes of `--request` distinct ids x `--width` fp32 sparse-Adam gradients, four ways:

- wal: what a cold shard does: each push's after-images appended to the write-ahead log (handed
  to the OS), rows updated in DRAM, and the dirty rows flushed to LMDB by the periodic checkpoint
  (one at the end here: with the default 256 MiB of log, one per ~20 such pushes);
- write_through: no log; at the end of each push every row it changed is written to LMDB in one
  transaction (the arena's dirty rows: `TableStores.flush`), so LMDB alone is the durable state;
- wal_fsync / write_through_fsync: the same with the durability of StorageConfig.wal_fsync: the
  log fsynced per push, or LMDB synced (`env.sync`) after each push's transaction.

Measured per mode, `--rounds` fresh shards each, median and spread (min-max): pushed rows per
second (the final checkpoint included for the log modes), bytes sent to the disk per pushed row
(/proc/self/io write_bytes, counted as pages are dirtied: the log's appends and LMDB's pages; a
final sync makes every mode count all it wrote), and the recovery time: a second shard of each
round is abandoned without a flush (as SIGKILL leaves it) and reopened: the log modes replay
their whole log, write-through has nothing to replay.

Write-through is emulated here (the shard's other durable state, committed steps and moved
rows, which a real implementation would write in the same transaction, is left out: a few
hundred bytes per push), so its figures are a lower bound on its cost.

    python bench/bench_write_through.py [--pushes 20] [--request 16384] [--rounds 3] [--out bench/results/write_through]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig  # noqa: E402
from memory_service.shard.shard import Shard  # noqa: E402
from memory_service.tables import TablePush  # noqa: E402

MODES = {"wal": dict(wal=True), "wal_fsync": dict(wal=True, wal_fsync=True),
         "write_through": dict(wal=False), "write_through_fsync": dict(wal=False)}


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes")).split()[1])


def open_shard(path: str, args, **kw) -> Shard:
    budget = args.resident * (17 + 12 * args.width) * 17 // 15  # rows the arena holds, with headroom
    shard = Shard(0, 1, StorageConfig(path=path, dram_budget_bytes=budget, flush_interval_s=3600,
                                      flush_wal_bytes=1 << 40, **kw))
    shard.create_table(TableConfig("t", args.rows, args.width, optimizer=OptimizerConfig("sparse_adam")))
    return shard


def run_pushes(shard: Shard, mode: str, batch: list[TablePush]) -> None:
    for push in batch:
        shard.push("bench", {"t": push}, request_seq=push.step)
        if mode.startswith("write_through"):  # this push's rows straight to LMDB
            shard._tables.flush()
            if mode.endswith("fsync"):
                shard._tables.disk.sync()


def one_round(tmp: str, mode: str, args, batch: list[TablePush], r: int) -> dict:
    kw = MODES[mode]
    shard = open_shard(f"{tmp}/{mode}-{r}", args, **kw)
    before = write_bytes()
    start = time.perf_counter()
    run_pushes(shard, mode, batch)
    if mode.startswith("wal"):
        shard.flush()  # the periodic checkpoint these pushes' log would trigger
    seconds = time.perf_counter() - start
    shard._tables.disk.sync()
    written = write_bytes() - before
    shard.close()
    # recovery: the same pushes, abandoned without a flush, reopened
    path = f"{tmp}/{mode}-{r}-crash"
    shard = open_shard(path, args, **kw)
    run_pushes(shard, mode, batch)
    shard.placer.stop()
    shard.journal.close()
    shard._tables.disk.close()
    start = time.perf_counter()
    reopened = Shard(0, 1, StorageConfig(path=path, dram_budget_bytes=1 << 20, **kw))
    recovery = time.perf_counter() - start
    reopened.close()
    rows = len(batch) * args.request
    return {"rows_per_s": rows / seconds, "bytes_per_row": written / rows, "recovery_s": recovery}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--request", type=int, default=16384)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--resident", type=int, default=65536, help="rows the DRAM budget holds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    hot = rng.choice(args.rows, args.resident, replace=False)  # pushes favour rows DRAM can hold
    batch = [TablePush(step, np.unique(np.r_[rng.choice(hot, args.request * 3 // 4, replace=False),
                                              rng.choice(args.rows, args.request // 4, replace=False)]),
                       None) for step in range(1, args.pushes + 1)]
    batch = [TablePush(p.step, p.ids, rng.standard_normal((len(p.ids), args.width)).astype(np.float32))
             for p in batch]
    args.request = int(np.mean([len(p.ids) for p in batch]))
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in MODES:  # alternating: the machine's load falls on every mode alike
                runs[mode].append(one_round(tmp, mode, args, batch, r))
                print(mode, json.dumps(runs[mode][-1]), flush=True)
    summ = {mode: {k: {"median": statistics.median(x[k] for x in rs), "min": min(x[k] for x in rs),
                       "max": max(x[k] for x in rs)} for k in rs[0]} for mode, rs in runs.items()}
    lines = [f"{args.pushes} pushes of ~{args.request} distinct rows x {args.width} fp32 (sparse Adam; 3/4 of "
             f"each push among {args.resident} rows DRAM holds), {args.rows:,} rows; {args.rounds} rounds, median "
             f"(min-max)", "", "| mode | M rows/s | bytes to disk per row | recovery s (whole run unflushed) |",
             "|---|---|---|---|"]
    for mode, s in summ.items():
        lines.append(f"| {mode} | " + " | ".join(
            f"{s[k]['median'] * scale:.{digits}f} ({s[k]['min'] * scale:.{digits}f}-{s[k]['max'] * scale:.{digits}f})"
            for k, scale, digits in (("rows_per_s", 1e-6, 3), ("bytes_per_row", 1, 0), ("recovery_s", 1, 2))) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summ},
                                                       indent=1) + "\n")
        out.with_suffix(".md").write_text("# WAL vs LMDB write-through (bench/bench_write_through.py)\n\n" + text)


if __name__ == "__main__":
    main()
