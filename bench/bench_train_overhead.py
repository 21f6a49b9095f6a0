"""Training step time with the Engram tables in-process vs in the table service.

Same model (the demo's: `tiny` preset, 128-token sequences, batches of 16), same data and seed, in
one script; modes: `local` (in-process tables, the baseline), `sync` (service, rows fetched when
the forward reaches the Engram layer), `prefetch` (service, rows requested as soon as the batch is
drawn plus the next step's during this one: exact, the default), `stale` (prefetch with staleness
1: the look-ahead fetch is not held for this step's push). Work per step: B*T*H row ids per Engram
layer, fetched (deduplicated) and their gradients pushed; bytes: unique rows x width x 4 each way.
The floor is the local step. On this machine trainer and shards share 2 cores, so the service's
CPU work is not free as it would be on separate hosts: the embedded cluster (start_local: 2 cold
+ 1 hot shards) runs its shards at the lowest CPU priority (`--niceness` to compare).

The modes train side by side, taking turns a few steps at a time (see `interleaved`), so slow
drifts of a shared machine hit all of them alike. Prints per mode the mean step time (after
`--warmup` counted steps), its ratio to local, the CPU the trainer's process and the shards used
per step, and the held-out loss (the staleness mode's loss effect); rows per step (total and
unique) and the service's cost per 1k unique rows (wall: sync - local; and the shards' CPU).
`--json`: one object with `overhead_sync`, `overhead_prefetch`, `overhead_stale` (step-time ratio
- 1), `ms_per_1k_rows` and `shard_cpu_ms_per_1k_rows`.

`--device cuda` runs the same comparison on the GPU (the hot shard's rows on it too; step times
taken after a device synchronisation). `--cluster processes` starts the shards as plain local
processes instead of Ray actors (bench/shard_processes.py: for a machine without Ray).
`--profile DIR` then trains a few more prefetch-mode steps under torch.profiler (bench/profile_trace.py),
writes DIR/trace.json.gz and prints how much of the fetch time the forward did not wait for.

    python bench/bench_train_overhead.py [--steps 48] [--json]    # ~5 min here
    python bench/bench_train_overhead.py --device cuda --cluster processes --steps 16 --profile trace
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from memory_service.server.shard_process import SHARD_ENV, reexec_with
from trainer import colocation

colocation.apply()  # it trains beside its shards (the re-exec below keeps what this sets)
reexec_with(SHARD_ENV)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shard_processes import start_embedded  # noqa: E402  (bench/, beside this script)
from profile_trace import SKIPPED_STEPS, WARMUP_STEPS, step_profiler, summarize, summary_line  # noqa: E402
from trainer.data import Batches, Corpus, CorpusConfig  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402
from trainer.train import DEVICES, ServiceOptions, TrainConfig, build, train  # noqa: E402

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


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(cfg: TrainConfig, corpus: Corpus, modes: dict[str, dict], block: int, settle: float,
                shard_pids: list[int], progress: bool, sent: Callable[[], Counter] = Counter) -> dict[str, dict]:
    """Trains one model per mode, taking turns `block` steps at a time (one thread per mode, one
    running at any moment). Taking turns puts every mode under the same slow drifts of a shared
    machine (run in sequence, the order of the modes moved the figures by +-10%). At the end of a
    turn the machine is left `settle` s for the service's work of the last step (its push, commit
    and held fetch), and the first step of a turn is not counted: its rows were ready before it
    began. Returns per mode: `step_s` (the counted steps' times), `turns` (turn -> its counted steps' times), CPU seconds of the trainer's
    process and of the shards over the counted steps and their settles (`trainer_cpu_s`,
    `shard_cpu_s`), the requests sent meanwhile by rpc (`requests`: `sent()` counts them so far),
    and `val_loss`."""
    names = list(modes)
    turn = threading.Condition()
    state = {"running": names[0], "done": set()}
    out = {name: {"step_s": [], "turns": {}, "trainer_cpu_s": 0.0, "shard_cpu_s": 0.0, "requests": Counter()}
           for name in names}
    errors: list[BaseException] = []

    def cpu() -> tuple[float, float, Counter]:
        return time.process_time(), sum(process_cpu_s(pid) for pid in shard_pids), sent()

    def hand_over(name: str) -> None:
        """`name` waits while the next unfinished mode takes its turn."""
        with turn:
            rest = [n for n in names[names.index(name) + 1:] + names[:names.index(name) + 1]
                    if n not in state["done"]]
            state["running"] = rest[0] if rest else None
            turn.notify_all()
            turn.wait_for(lambda: state["running"] in (name, None))

    def run(name: str) -> None:
        mine, last, since = out[name], [0.0], [(0.0, 0.0, Counter())]

        def on_step(step: int) -> None:
            if cfg.device == "cuda":
                torch.cuda.synchronize()  # the step's kernels done before it counts as ended
            now = time.perf_counter()
            if step % block:
                mine["step_s"].append(now - last[0])
                mine["turns"].setdefault(step // block, []).append(now - last[0])
            else:  # the first step of a turn ends: count from here
                since[0] = cpu()
            if step % block == block - 1 or step == cfg.steps - 1:
                time.sleep(settle)
                (trainer, shards, requests), (trainer0, shards0, requests0) = cpu(), since[0]
                mine["trainer_cpu_s"] += trainer - trainer0
                mine["shard_cpu_s"] += shards - shards0
                mine["requests"] += requests - requests0
                if step < cfg.steps - 1:
                    hand_over(name)
            last[0] = time.perf_counter()

        try:
            with turn:
                turn.wait_for(lambda: state["running"] == name)
            mine["val_loss"] = train(cfg, corpus, on_step=on_step, **modes[name]).val_loss
            if progress:
                print(f"{name:>9}: {1e3 * np.mean(mine['step_s']):7.1f} ms/step  held-out {mine['val_loss']:.4f}",
                      flush=True)
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)
        finally:
            with turn:
                state["done"].add(name)
            hand_over(name)

    threads = [threading.Thread(target=run, args=(name,), name=f"mode-{name}") for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def paired_ratios(runs: dict[str, dict], mode: str, skip_turns: int = 1) -> dict:
    """Per turn, `mode`'s mean step time over local's in the same round of turns (seconds apart,
    so slow drifts of the machine cancel): the median and the 10th/90th percentiles over the
    turns after the first `skip_turns`, and the share of turns within 10% of local."""
    mine, base = runs[mode]["turns"], runs["local"]["turns"]
    ratios = np.array([np.mean(mine[t]) / np.mean(base[t]) for t in sorted(mine) if t >= skip_turns and t in base])
    if not ratios.size:
        return {"turns": 0}
    p10, median, p90 = np.percentile(ratios, [10, 50, 90])
    return {"turns": int(ratios.size), "median": float(median - 1), "p10": float(p10 - 1), "p90": float(p90 - 1),
            "within_10pct": float(np.mean(ratios <= 1.10))}


def profiled(cfg: TrainConfig, corpus: Corpus, client, path: str, steps: int) -> dict:
    """`steps` prefetch-mode steps (after the profiler's skipped and warm-up ones) traced into
    `path`; the trace's summary."""
    total = SKIPPED_STEPS + WARMUP_STEPS + steps + 1
    cfg = replace(cfg, steps=total, warmup_steps=min(cfg.warmup_steps, total - 1), eval_batches=1)
    with step_profiler(path, cfg.device, steps) as prof:
        train(cfg, corpus, client=client, service=replace(MODES["prefetch"], prefix="profile"),
              on_step=lambda step: prof.step())
    return summarize(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=48, help="steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="counted steps left out of the mean")
    p.add_argument("--niceness", type=int, default=None,
                   help="the shards' CPU priority (default: start_local's, LOCAL_NICENESS)")
    p.add_argument("--block", type=int, default=4, help="steps each mode runs per turn")
    p.add_argument("--settle", type=float, default=0.5, help="seconds left to the service at each turn")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the models train")
    p.add_argument("--cluster", default="ray", choices=("ray", "processes"),
                   help="shards as Ray actors (start_local) or plain local processes (no Ray needed)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace prefetch-mode steps into DIR/trace.json.gz and summarise the fetches")
    p.add_argument("--profile-steps", type=int, default=4, help="steps traced with --profile")
    p.add_argument("--corpus", default=None, help="folder of text/source files (default: Python stdlib)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.profile_steps < 1:
        p.error(f"--profile-steps {args.profile_steps} must be >= 1")
    model = replace(ModelConfig.from_name("tiny"), context=128)
    cfg = TrainConfig(model=model, corpus=CorpusConfig(corpus_dir=args.corpus), steps=args.steps, batch_size=16,
                      warmup_steps=min(20, args.steps // 10), table_lr_mult=50.0, progress=False,
                      device=args.device)
    corpus = Corpus.load(cfg.corpus)
    total, unique = rows_per_step(cfg, corpus, args.steps)

    cluster, pids, niceness = start_embedded(args.cluster, args.device, "bench-train", args.niceness)
    profile = None
    try:
        with cluster.client() as client:
            modes = {"local": {}} | {name: {"client": client, "service": service} for name, service in MODES.items()}
            runs = interleaved(cfg, corpus, modes, args.block, args.settle, pids, progress=not args.json,
                               sent=lambda: client.transport.sent.copy())
            num_shards = client.num_shards
            if args.profile:
                profile = profiled(cfg, corpus, client, os.path.join(args.profile, "trace.json.gz"),
                                   args.profile_steps)
    finally:
        cluster.shutdown()
    step_s = {name: float(np.mean(r["step_s"][args.warmup:])) for name, r in runs.items()}
    cpu_ms = {name: {k: 1e3 * r[f"{k}_cpu_s"] / len(r["step_s"]) for k in ("trainer", "shard")}
              for name, r in runs.items()}
    out = {
        "preset": "tiny", "context": 128, "batch_size": 16, "shards": 2, "hot_shards": len(pids) - 2,
        "steps": args.steps, "niceness": niceness, "device": args.device, "cluster": args.cluster,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "table_optimizer": cfg.table_optimizer,
        "rows_per_step": total, "unique_rows_per_step": unique,
        "step_ms": {k: 1e3 * v for k, v in step_s.items()}, "cpu_ms_per_step": cpu_ms,
        "val_loss": {name: r["val_loss"] for name, r in runs.items()},
        "overhead_sync": step_s["sync"] / step_s["local"] - 1,
        "overhead_prefetch": step_s["prefetch"] / step_s["local"] - 1,
        "overhead_stale": step_s["stale"] / step_s["local"] - 1,
        "ms_per_1k_rows": 1e3 * (step_s["sync"] - step_s["local"]) / (unique / 1e3),
        "shard_cpu_ms_per_1k_rows": cpu_ms["prefetch"]["shard"] / (unique / 1e3),
        "paired": {name: paired_ratios(runs, name) for name in MODES},  # overheads per round of turns
        # rpcs a counted step sent to each shard, by rpc (the settles' included: a step's push and commit)
        "requests_per_step_per_shard": {name: {rpc: n / len(runs[name]["step_s"]) / num_shards
                                               for rpc, n in sorted(runs[name]["requests"].items())} for name in MODES},
        "profile": profile,
    }
    if profile is not None:
        print(summary_line(profile), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(out))
        return out
    print(f"rows per step: {total:,.0f} ids, {unique:,.0f} unique (per table, summed); shards' niceness "
          f"{out['niceness']}")
    print("     mode   ms/step  vs local  trainer CPU ms/step  shards' CPU ms/step  held-out")
    for name in runs:
        print(f"{name:>9} {1e3 * step_s[name]:9.1f} {step_s[name] / step_s['local']:9.3f} "
              f"{cpu_ms[name]['trainer']:20.1f} {cpu_ms[name]['shard']:20.1f}  {out['val_loss'][name]:.4f}")
    for name, paired in out["paired"].items():
        if paired["turns"]:
            print(f"{name:>9} vs local per round of turns ({paired['turns']}): median {paired['median']:+.1%}, "
                  f"p10 {paired['p10']:+.1%}, p90 {paired['p90']:+.1%}; {paired['within_10pct']:.0%} of rounds within +10%")
    for name, requests in out["requests_per_step_per_shard"].items():
        print(f"{name:>9} requests per step and shard: " + ", ".join(f"{rpc} {n:.2f}" for rpc, n in requests.items()))
    print(f"service cost: {out['ms_per_1k_rows']:.2f} ms per 1k unique rows (sync - local, wall); the shards' "
          f"CPU {out['shard_cpu_ms_per_1k_rows']:.2f} ms per 1k unique rows (prefetch)")
    return out


if __name__ == "__main__":
    main()
