"""Chaos run: train through 2 cold + 1 hot shards (all LMDB-backed) while a random shard, the hot
one included, is killed with kill -9 every ~`--interval` seconds; the final tables must equal an
uninterrupted run's exactly (issue 22's acceptance: >= 5 minutes, a kill every ~30 s).

A real local Ray cluster (memory_service.cluster.launch) per run, each shard with a disk
directory under a temporary folder: cold shards `shard-NNNN`, the hot shard `hot-NNNN`, each with
LMDB and a write-ahead log, restarted by Ray after every crash (max_restarts -1); the hot shard's
small capacity keeps rows moving both ways, so kills land mid-move too. Shards flush every
`--flush-interval` seconds, so restarts recover from a checkpoint plus the log after it.

1. A probe trains a few steps on a calm cluster to time a step once warm; the step count is set
   so the chaos run lasts at least `--duration` (with a margin: kills and restarts only make it
   slower, but a shared machine's pace varies).
2. The chaos run: that many steps on a new cluster while a killer thread picks a shard at random
   every interval (+-20%; each shard once in every three kills) and kills its process with SIGKILL;
   a ShardWatch (memory_service/cluster_watch.py) prints each restart and the write-ahead log
   records it replayed.
3. The reference: the same steps on a calm cluster.
4. Every table's rows, optimizer state, last steps and step logs, read from whichever shard homes
   each row (migration stopped first), one sha256 per table, and the training losses, compared.

The training is the trainer's own loop (trainer.train.train with a MemoryClient, as `engram train`
runs it), a small model whose tables use sparse Adam (exact whichever shard a row sits on). What is
tested is exactness through re-sent requests (request_seq), recovery and the hot shard's resumed moves.

    python bench/chaos.py [--duration 300] [--interval 30] [--seed 0]

Writes bench/results/chaos.md and .json (`--out` elsewhere); exits 1 if the tables or losses differ,
no shard was killed, or the chaos run was shorter than `--duration` (the probe's pace was off).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray

from memory_service.cluster import ClusterConfig, launch
from memory_service.config import StorageConfig
from memory_service.ray_attach import init_local_ray
from report import write_results  # bench/report.py
from trainer.data import Corpus, CorpusConfig
from trainer.engram import EngramConfig
from trainer.model import ModelConfig
from trainer.train import ServiceOptions, TrainConfig, train

SERVICE = ServiceOptions(prefix="chaos", lookahead=True)
FIELDS = ("ids", "rows", "state", "last")
SIZING_MARGIN = 1.5  # steps for this many times the duration at the probe's pace (a shared machine varies)


def train_config(cache: str, steps: int) -> TrainConfig:
    """A small model whose two Engram tables see many rows moved between cold and hot shards."""
    e = EngramConfig(hidden_size=32, num_branches=2, max_ngram=3, heads_per_ngram=2, d_mem=16,
                     table_sizes=(4099, 4099), layer_ids=(0,), init_scale=0.1)
    model = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_hidden=64, context=32, num_branches=2,
                        engram=e)
    corpus = CorpusConfig(vocab_size=512, max_files=40, cache_dir=cache)
    return TrainConfig(model=model, corpus=corpus, steps=steps, batch_size=8, warmup_steps=3, eval_batches=2,
                       table_optimizer="sparse_adam", table_lr_mult=5.0, threads=1, progress=False)


def cluster_config(name: str, path: str, flush_interval_s: float) -> ClusterConfig:
    storage = StorageConfig(path=path, dram_budget_bytes=256 << 10, placement_interval_s=0.02,
                            flush_interval_s=flush_interval_s)
    return ClusterConfig(num_shards=2, num_hot=1, hot_rows=256, hot_device="cpu", migrate_interval_s=0.01,
                         migrate_max_duty=0.5, max_restarts=-1, name=name, storage=storage)


def tables_of(cluster, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{table: every written row with its optimizer state and last step, from whichever shard is
    its home (id order), and each shard's step log}; migration stops first so rows hold still."""
    for actor in cluster.hot_actors:
        ray.get(actor.stop_migration.remote())
    actors = [*cluster.actors, *cluster.hot_actors]
    out = {}
    for name in names:
        states = [ray.get(actor.table_state.remote(name)) for actor in actors]
        ids = np.concatenate([s["ids"] for s in states])
        if len(np.unique(ids)) != len(ids):
            raise AssertionError(f"{name}: a row has two homes")
        order = np.argsort(ids)
        out[name] = {f: np.concatenate([s[f] for s in states])[order] for f in FIELDS}
        out[name].update({f"lrs{i}": s["lrs"] for i, s in enumerate(states)})
    return out


def digest(table: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(table):
        h.update(key.encode())
        h.update(np.ascontiguousarray(table[key]).tobytes())
    return h.hexdigest()


class Killer:
    """Kills a random shard's process (cold or hot) every ~`interval` seconds until stopped."""

    def __init__(self, cluster, interval: float, seed: int, start: float):
        self.victims = [*((f"cold {i}", a) for i, a in enumerate(cluster.actors)),
                        *((f"hot {i}", a) for i, a in enumerate(cluster.hot_actors))]
        self.interval, self.rng, self.start = interval, random.Random(seed), start
        self.kills: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-killer", daemon=True)

    def _order(self):
        """The shards in a random order, again and again: each is killed once every len(victims)
        kills, so a short run kills the hot shard too."""
        while True:
            yield from self.rng.sample(self.victims, len(self.victims))

    def _run(self) -> None:
        order = self._order()
        while not self.stop.wait(self.interval * self.rng.uniform(0.8, 1.2)):
            label, actor = next(order)
            try:
                pid = ray.get(actor.pid.remote(), timeout=120)  # it serves (a restart may be under way)
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                print(f"  could not reach {label} to kill it: {err!r}", flush=True)
                continue
            os.kill(pid, signal.SIGKILL)
            at = time.monotonic() - self.start
            self.kills.append({"t_s": round(at, 1), "shard": label, "pid": pid})
            print(f"  t={at:6.1f} s  kill -9 {label} (pid {pid})", flush=True)


def run(cfg: TrainConfig, corpus: Corpus, config: ClusterConfig, interval: float | None, seed: int) -> dict:
    """Trains `cfg` through a new cluster `config`, killing shards every `interval` s (None: calm)."""
    cluster = launch(config)
    try:
        watch = cluster.watch()
        start = time.monotonic()
        killer = Killer(cluster, interval, seed, start) if interval else None
        restarts: list[str] = []
        watching = threading.Event()

        def follow() -> None:
            while not watching.is_set():
                for event in watch.poll(1.0):
                    restarts.append(str(event))
                    print(f"  t={time.monotonic() - start:6.1f} s  {event}", flush=True)
                watching.wait(1.0)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        if killer is not None:
            killer.thread.start()
        ends: list[float] = []
        with cluster.client() as client:
            result = train(cfg, corpus, client=client, service=SERVICE,
                           on_step=lambda _: ends.append(time.monotonic()))
            retries = client.retries
            names = sorted(t.name for t in client.report().shards[0].tables)
        seconds = time.monotonic() - start
        if killer is not None:
            killer.stop.set()
            killer.thread.join()
        watching.set()
        follower.join()
        for event in watch.poll(5.0):  # a restart after the last look
            restarts.append(str(event))
        migration = ray.get(cluster.hot_actors[0].migration_counters.remote())
        tables = tables_of(cluster, names)
        steady = np.diff(ends[len(ends) // 4:])  # past the first steps' warm-up
        return {"seconds": seconds, "step_s": float(np.median(steady)) if len(steady) else seconds, "losses": result.train_losses, "retries": retries, "tables": tables,
                "kills": killer.kills if killer else [], "restarts": restarts, "migration": migration}
    finally:
        try:
            cluster.shutdown()
        except Exception as err:  # noqa: BLE001 - a shard killed as the run ended
            print(f"  shutdown: {err}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds the chaos run trains at least")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between kills (+-20%%)")
    p.add_argument("--seed", type=int, default=0, help="which shards are killed, and when")
    p.add_argument("--flush-interval", type=float, default=10.0, help="seconds between the shards' checkpoints")
    p.add_argument("--probe-steps", type=int, default=40, help="steps timed to size the runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "chaos"))
    args = p.parse_args(argv)
    logging.getLogger("memory_service.cluster_watch").setLevel(logging.ERROR)  # run() prints each restart
    init_local_ray()
    with tempfile.TemporaryDirectory(prefix="engram-chaos-") as tmp:
        corpus = Corpus.load(train_config(tmp, args.probe_steps).corpus)
        probe = run(train_config(tmp, args.probe_steps), corpus,
                    cluster_config("chaos-probe", f"{tmp}/probe", args.flush_interval), None, args.seed)
        steps = max(args.probe_steps, math.ceil(SIZING_MARGIN * args.duration / probe["step_s"]))
        cfg = train_config(tmp, steps)
        print(f"probe: {args.probe_steps} steps in {probe['seconds']:.1f} s ({1e3 * probe['step_s']:.0f} ms a "
              f"step once warm): {steps} steps for >= {args.duration:g} s", flush=True)
        print(f"chaos run (kill -9 of a random shard every ~{args.interval:g} s) ...", flush=True)
        chaos = run(cfg, corpus, cluster_config("chaos", f"{tmp}/chaos", args.flush_interval),
                    args.interval, args.seed)  # right after the probe: the machine's pace is the probe's
        print(f"  {steps} steps in {chaos['seconds']:.1f} s", flush=True)
        print("reference run (no kills) ...", flush=True)
        calm = run(cfg, corpus, cluster_config("chaos-calm", f"{tmp}/calm", args.flush_interval), None, args.seed)
        print(f"  {steps} steps in {calm['seconds']:.1f} s", flush=True)
    return report(args, steps, calm, chaos)


def report(args, steps: int, calm: dict, chaos: dict) -> int:
    lines = [f"# Chaos run: {steps} steps through 2 cold + 1 hot LMDB-backed shards, kill -9 of a random "
             f"shard every ~{args.interval:g} s",
             "", f"`python bench/chaos.py --duration {args.duration:g} --interval {args.interval:g} "
             f"--seed {args.seed}`", "",
             f"- reference run: {calm['seconds']:.1f} s; chaos run: {chaos['seconds']:.1f} s "
             f"({len(chaos['kills'])} kills, {chaos['retries']} client retries)",
             f"- hot shard's migration in the chaos run since its last restart: {chaos['migration']}",
             "", "| t (s) | killed | pid |", "|---:|---|---:|"]
    lines += [f"| {k['t_s']} | {k['shard']} | {k['pid']} |" for k in chaos["kills"]]
    lines += ["", "Restarts seen by the watch:", ""] + [f"- {r}" for r in chaos["restarts"]]
    lines += ["", "| table | reference sha256 | chaos sha256 | equal |", "|---|---|---|---|"]
    equal = {}
    for name in sorted(calm["tables"]):
        a, b = digest(calm["tables"][name]), digest(chaos["tables"].get(name, {}))
        equal[name] = a == b
        lines.append(f"| {name} | {a[:16]} | {b[:16]} | {'yes' if a == b else 'NO'} |")
    same_tables = sorted(calm["tables"]) == sorted(chaos["tables"]) and all(equal.values())
    same_losses = calm["losses"] == chaos["losses"]
    long_enough = chaos["seconds"] >= args.duration
    ok = same_tables and same_losses and len(chaos["kills"]) > 0 and long_enough
    lines += ["", f"training losses equal: {'yes' if same_losses else 'NO'}; every table equal: "
              f"{'yes' if same_tables else 'NO'}; chaos run lasted >= {args.duration:g} s: "
              f"{'yes' if long_enough else 'NO'}", "", f"result: {'PASS' if ok else 'FAIL'}"]
    text = "\n".join(lines)
    print(text, flush=True)
    write_results(args.out, text, {
        "steps": steps, "duration_s": args.duration, "interval_s": args.interval, "seed": args.seed,
        "reference_s": round(calm["seconds"], 1), "chaos_s": round(chaos["seconds"], 1),
        "kills": chaos["kills"], "restarts": chaos["restarts"], "client_retries": chaos["retries"],
        "kills_of_hot": sum(k["shard"].startswith("hot") for k in chaos["kills"]),
        "tables_equal": equal, "losses_equal": same_losses, "long_enough": long_enough, "pass": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
