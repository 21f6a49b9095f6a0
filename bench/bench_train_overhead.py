"""Training step time with the Engram tables in-process vs in the table service.

Same model (the demo's: `tiny` preset, 128-token sequences, batches of 16), same data and seed, in
one script; modes: `local` (in-process tables, the baseline), `sync` (service, rows fetched when
the forward reaches the Engram layer), `prefetch` (service, rows requested as soon as the batch is
drawn plus the next step's during this one: exact, the default), `stale` (prefetch with staleness
1: the look-ahead fetch is not held for this step's push). Work per step: B*T*H row ids per Engram
layer, fetched (deduplicated) and their gradients pushed; bytes: unique rows x width x 4 each way.
The floor is the local step. On this machine trainer and shards share 2 cores, so the service's
CPU work is not free as it would be on separate hosts.

Prints the mean step time per mode (after `--warmup` steps), the ratio to local, rows per step
(total and unique), the service's cost in ms per 1k unique rows (sync - local), and the held-out
loss per mode (the staleness mode's loss effect). `--json`: one object with `overhead_sync`,
`overhead_prefetch`, `overhead_stale` (step-time ratio - 1) and `ms_per_1k_rows`.

    python bench/bench_train_overhead.py [--steps 40] [--warmup 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

import numpy as np  # noqa: E402
import torch  # noqa: E402

from memory_service.cluster import start_local  # noqa: E402
from trainer.data import Batches, Corpus, CorpusConfig  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402
from trainer.train import ServiceOptions, TrainConfig, build, train  # noqa: E402

MODES = {
    "sync": ServiceOptions(prefix="sync", prefetch=False),
    "prefetch": ServiceOptions(prefix="prefetch"),
    "stale": ServiceOptions(prefix="stale", staleness=1),
}


def rows_per_step(cfg: TrainConfig, corpus: Corpus, steps: int) -> tuple[float, float]:
    """Mean row ids per step over all Engram tables: total and distinct per table, summed."""
    _, indexer, _ = build(cfg, corpus)
    batches = Batches(corpus.train, cfg.batch_size, cfg.model.context, seed=cfg.seed)
    total = unique = 0
    for _ in range(steps):
        x, _ = batches.next()
        for ids in indexer(x).values():  # (B, T, H)
            total += ids.numel()
            unique += sum(len(np.unique(ids[..., h].numpy())) for h in range(ids.shape[-1]))
    return total / steps, unique / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the mean")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model = replace(ModelConfig.from_name("tiny"), context=128)
    cfg = TrainConfig(model=model, corpus=CorpusConfig(), steps=args.steps, batch_size=16,
                      warmup_steps=min(20, args.steps // 10), table_lr_mult=50.0, progress=False)
    corpus = Corpus.load(cfg.corpus)
    total, unique = rows_per_step(cfg, corpus, args.steps)

    step_s, val = {}, {}

    def timed(name: str, **kwargs) -> None:
        ends = []
        result = train(cfg, corpus, on_step=lambda step: ends.append(time.perf_counter()), **kwargs)
        gaps = np.diff(ends)[args.warmup:]  # (steps - 1 - warmup,) seconds per step
        step_s[name], val[name] = float(gaps.mean()), result.val_loss
        if not args.json:
            print(f"{name:>9}: {1e3 * step_s[name]:7.1f} ms/step  held-out {result.val_loss:.4f}", flush=True)

    timed("local")
    cluster = start_local(num_shards=2, name="bench-train")
    try:
        with cluster.client() as client:
            for name, service in MODES.items():
                timed(name, client=client, service=service)
    finally:
        cluster.shutdown()
    out = {
        "preset": "tiny", "context": 128, "batch_size": 16, "shards": 2, "steps": args.steps,
        "threads": torch.get_num_threads(), "table_optimizer": cfg.table_optimizer,
        "rows_per_step": total, "unique_rows_per_step": unique,
        "step_ms": {k: 1e3 * v for k, v in step_s.items()}, "val_loss": val,
        "overhead_sync": step_s["sync"] / step_s["local"] - 1,
        "overhead_prefetch": step_s["prefetch"] / step_s["local"] - 1,
        "overhead_stale": step_s["stale"] / step_s["local"] - 1,
        "ms_per_1k_rows": 1e3 * (step_s["sync"] - step_s["local"]) / (unique / 1e3),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"rows per step: {total:,.0f} ids, {unique:,.0f} unique (per table, summed)")
    for name in MODES:
        print(f"{name:>9}: {step_s[name] / step_s['local']:.3f}x local ({100 * out[f'overhead_{name}']:+.1f}%)")
    print(f"service cost: {out['ms_per_1k_rows']:.2f} ms per 1k unique rows (sync - local)")


if __name__ == "__main__":
    main()
