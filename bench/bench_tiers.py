"""Hot and cold tiers on the training stream. Placement (this file's own section): the hot-tier hit
rate of each placement policy next to Belady's optimum, per N-gram order and over the layer.

The trace is what the tiny preset's Engram layer reads on the corpus's train split in the training
loader's order (trainer/row_trace.py): 256-token sequences shuffled each epoch, 16 per step, row
ids deduplicated per step and table; one epoch of warm-up, then one measured epoch. Each table has
its own tier and policy, holding `--hot-fraction` of the rows that table touches in the measured
epoch (per table, for every policy and for Belady alike). Admission is on demand (a row comes in
right after a read of it), the service's semantics (memory_service/placement/policy.py).

Beside the policies: Belady's MIN (offline, the ceiling with these semantics) and the static top-C
(the rows the measured epoch reads most, known in advance and held fixed): on shuffled batches,
reads are exchangeable, so frequency is the only signal an online policy has and the static top-C
is about what frequency alone reaches. Past it, only the look-ahead helps: the rows of announced
requests. The service sees 7 (the next step's held fetch and the 6 steps after it, which the trainer
announces: trainer/prefetch.py); the curve shows what fewer or more give.
Also the hot fraction at which the policy reaches a 90% hit rate, and what one plan costs.

Through the service (`service_section`, skipped with --skip-service): the same kind of trace, on
`--service-split-fraction` of the split, replayed as fetches through real clusters in an embedded
Ray: 1 hot + 2 cold shards (LMDB under the cold shards' DRAM, the hot shard holding the same
share of rows), then 2 all-DRAM shards on the same request stream. The hot tier's hit rate is read
from the shards' Stats counters over the measured epoch, beside the offline replay at the same
capacity; fetch rows/s of the two clusters give `service_vs_dram`. Steps are `--service-step-s`
apart (the trainer's compute; the migrator works in between) and the migrator's duty cap is raised
to `--migrate-max-duty` (1.0: at the service's 0.05 a round of ~0.5 s is followed by ~10 s of
pause and the replay ends before the hot set forms).

    PYTHONPATH=. python bench/bench_tiers.py --json     # ~13 min on 2 cores (741 s, the service section ~3 min)
    PYTHONPATH=. python bench/bench_tiers.py --split-fraction 0.125 --lookahead-curve 1 --skip-service  # ~1 min
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from memory_service.cluster import ClusterConfig, launch
from memory_service.config import StorageConfig
from memory_service.placement import Policy, make_policy
from memory_service.placement.replay import belady_hit_rate, num_reads, simulate
from memory_service.ray_attach import init_local_ray
from memory_service.storage.usage import DEVICE_TIER, DRAM_TIER
from trainer.data import Corpus, CorpusConfig
from trainer.remote_tables import RemoteTables
from trainer.row_trace import RowTrace
from trainer.train import TrainConfig, build_indexer, table_optimizer_config
from report import write_results  # bench/report.py (bench/ is on sys.path when run as a script)

BASELINES = ("lfu", "lru", "random")
WARMUP_EPOCH, MEASURED_EPOCH = 0, 1


def load_trace(args, split_fraction: float) -> tuple[RowTrace, list[int]]:
    """Two epochs of the tiny preset's first Engram layer on the first `split_fraction` of the
    train split, and the row count of each of the layer's tables (for the service's tables)."""
    corpus = Corpus.load(CorpusConfig())
    cfg = TrainConfig()
    indexer = build_indexer(cfg, corpus)
    layer = cfg.model.engram.layer_ids[0]
    tokens = corpus.train[: int(len(corpus.train) * split_fraction)]
    trace = RowTrace.from_tokens(tokens, indexer, layer, context=args.context, batch_size=args.batch_size,
                                 epochs=2, seed=args.seed)
    return trace, indexer.table_sizes()[layer]


def capacities(trace: RowTrace, fraction: float) -> list[int]:
    """Rows each table's tier holds: `fraction` of those it touches in the measured epoch."""
    return [int(fraction * trace.touched(h, MEASURED_EPOCH)) for h in range(len(trace.tables))]


def policy_rates(trace: RowTrace, name: str, caps: list[int], lookahead: int) -> list[float]:
    return [simulate(make_policy(name, c), batches, trace.steps_per_epoch, lookahead)
            for batches, c in zip(trace.tables, caps)]


def belady_rates(trace: RowTrace, caps: list[int]) -> list[float]:
    return [belady_hit_rate(batches, c, trace.steps_per_epoch) for batches, c in zip(trace.tables, caps)]


def static_rates(trace: RowTrace, caps: list[int]) -> list[float]:
    """Hit rate of holding, through the measured epoch, the C rows it reads most."""
    rates = []
    for h, c in enumerate(caps):
        counts = np.unique(np.concatenate(trace.epoch(h, MEASURED_EPOCH)), return_counts=True)[1]
        rates.append(float(np.sort(counts)[::-1][:c].sum() / counts.sum()))
    return rates


def aggregate(trace: RowTrace, rates: list[float]) -> dict[str, float]:
    """Per-table rates -> {"2": order-2 tables, "3": ..., "layer": all}, weighted by the reads."""
    reads = [num_reads(batches, trace.steps_per_epoch) for batches in trace.tables]
    scopes = {str(n): [h for h, o in enumerate(trace.orders) if o == n] for n in sorted(set(trace.orders))}
    scopes["layer"] = list(range(len(rates)))
    return {scope: sum(rates[h] * reads[h] for h in hs) / sum(reads[h] for h in hs) for scope, hs in scopes.items()}


def hot_fraction_for(trace: RowTrace, target: float, lookahead: int, lo: float, lo_rate: float,
                     tol: float = 0.01, max_probes: int = 8) -> tuple[float, float, float, int]:
    """(smallest fraction probed at which the policy's layer hit rate is >= target, that rate, the
    largest probed that fell short, probes). The rate rises with the fraction: regula falsi with
    the Illinois fix on [lo, hi], hi = 0.8 or 1 (large tiers are the slow probes), until the
    bracket is `tol` wide."""
    def rate(f: float) -> float:
        return aggregate(trace, policy_rates(trace, "engram", capacities(trace, f), lookahead))["layer"]
    if lo_rate >= target:
        return lo, lo_rate, 0.0, 0
    a, fa = lo, lo_rate - target  # fa < 0 <= fb: the root is inside [a, b]
    b, probes = 0.8, 1
    b_rate = rate(b)
    if b_rate < target:
        a, fa, b, b_rate, probes = b, b_rate - target, 1.0, rate(1.0), 2
    fb, side = b_rate - target, 0
    while b - a > tol and probes < max_probes:
        c = float(np.clip((a * fb - b * fa) / (fb - fa), a + tol / 4, b - tol / 4))  # the secant's root
        c_rate = rate(c)
        probes += 1
        if c_rate >= target:
            b, fb, b_rate = c, c_rate - target, c_rate
            fa = fa / 2 if side == -1 else fa  # b moved twice in a row: a's value is stale
            side = -1
        else:
            a, fa = c, c_rate - target
            fb = fb / 2 if side == 1 else fb
            side = 1
    return b, b_rate, a, probes


class TimedPolicy(Policy):
    """Another policy, passed through, with the wall time of each `plan` and the ids it weighed
    (the resident rows and those recorded since the last plan)."""

    def __init__(self, inner: Policy) -> None:
        super().__init__(inner.capacity)
        self.inner, self.seconds, self.ids, self._recorded = inner, [], [], 0

    def record(self, ids):
        self._recorded += len(ids)
        self.inner.record(ids)

    def expect(self, ids, step=None):
        self.inner.expect(ids, step)

    def plan(self, resident, max_moves=None):
        start = time.perf_counter()
        moves = self.inner.plan(resident, max_moves)
        self.seconds.append(time.perf_counter() - start)
        self.ids.append(len(resident) + self._recorded)
        self._recorded = 0
        return moves


def plan_cost(trace: RowTrace, caps: list[int], lookahead: int) -> dict:
    """Median cost of the policy's plan on table 0 over the measured epoch."""
    timed = TimedPolicy(make_policy("engram", caps[0]))
    simulate(timed, trace.tables[0], trace.steps_per_epoch, lookahead)
    seconds = np.array(timed.seconds[trace.steps_per_epoch:])
    ids = np.array(timed.ids[trace.steps_per_epoch:])
    return {"plan_ms_median": float(np.median(seconds) * 1e3), "ids_per_plan_median": int(np.median(ids)),
            "plan_ms_per_1k_ids": float(np.median(seconds / ids) * 1e6)}


def placement_section(args, trace: RowTrace) -> tuple[dict, list[str]]:
    """Hit rates at the hot fraction, the look-ahead curve, the fraction for the target, plan cost."""
    caps = capacities(trace, args.hot_fraction)
    per_table = {"engram": policy_rates(trace, "engram", caps, args.lookahead)}
    per_table |= {name: policy_rates(trace, name, caps, 0) for name in BASELINES}  # plain: no look-ahead
    per_table |= {"static": static_rates(trace, caps), "belady": belady_rates(trace, caps)}
    scopes = {name: aggregate(trace, rates) for name, rates in per_table.items()}
    curve = {k: scopes["engram"] if k == args.lookahead else
             aggregate(trace, policy_rates(trace, "engram", caps, k)) for k in args.lookahead_curve}
    belady = scopes["belady"]["layer"]
    reaching = [k for k in sorted(curve) if curve[k]["layer"] >= args.belady_share * belady]
    fraction, fraction_rate, short, probes = hot_fraction_for(trace, args.target, args.lookahead, args.hot_fraction,
                                                       scopes["engram"]["layer"])
    cost = plan_cost(trace, caps, args.lookahead)
    result = {
        "policy_hit_rate": scopes["engram"]["layer"], "lru_hit_rate": scopes["lru"]["layer"],
        "lfu_hit_rate": scopes["lfu"]["layer"], "random_hit_rate": scopes["random"]["layer"],
        "belady_hit_rate": belady, "static_top_hit_rate": scopes["static"]["layer"],
        "policy_over_belady": scopes["engram"]["layer"] / belady,
        "per_order": {scope: {name: scopes[name][scope] for name in scopes} for scope in scopes["belady"]
                      if scope != "layer"},
        "per_table": [{"order": trace.orders[h], "touched": trace.touched(h, MEASURED_EPOCH), "capacity": caps[h],
                       **{name: per_table[name][h] for name in per_table}} for h in range(len(caps))],
        "hot_fraction": args.hot_fraction, "lookahead": args.lookahead,
        "policy_hit_rate_by_lookahead": {str(k): curve[k]["layer"] for k in sorted(curve)},
        f"lookahead_for_{round(args.belady_share * 100)}": reaching[0] if reaching else None,
        f"hot_fraction_for_{round(args.target * 100)}": fraction,
        "hot_fraction_rate": fraction_rate, "hot_fraction_short": short, **cost,
        "trace": {"steps_per_epoch": trace.steps_per_epoch, "batch_size": args.batch_size, "context": args.context,
                  "split_fraction": args.split_fraction, "seed": args.seed},
    }
    return result, report(args, trace, per_table, scopes, curve, (fraction, fraction_rate, short, probes), cost)


def report(args, trace, per_table, scopes, curve, search, cost) -> list[str]:
    names = ("engram", *BASELINES, "static", "belady")
    lines = [f"# Hot-tier placement: tiny preset's Engram layer ({len(trace.tables)} tables), "
             f"{args.hot_fraction:.0%} of touched rows hot", "",
             f"Trace: train split x {args.split_fraction:g}, {args.context}-token sequences shuffled per epoch, "
             f"{args.batch_size} per step, {trace.steps_per_epoch} steps per epoch; epoch 1 warms up, epoch 2 is "
             f"measured. Capacity per table = {args.hot_fraction:.0%} of the rows it touches in epoch 2. engram: "
             f"look-ahead {args.lookahead} request(s); lfu, lru, random: none. static = the rows epoch 2 "
             f"reads most, known in advance and held (what frequency alone reaches); belady = offline MIN.", "",
             "| table | order | rows touched | capacity | " + " | ".join(names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for h in range(len(trace.tables)):
        lines.append(f"| {h} | {trace.orders[h]} | {trace.touched(h, MEASURED_EPOCH)} | "
                     f"{capacities(trace, args.hot_fraction)[h]} | "
                     + " | ".join(f"{per_table[n][h]:.4f}" for n in names) + " |")
    lines += ["", "| scope | " + " | ".join(names) + " | " + " | ".join(f"{n} / belady" for n in names[:-1]) + " |",
              "|---" * (2 * len(names)) + "|"]
    for scope in scopes["belady"]:
        label = "whole layer" if scope == "layer" else f"order {scope}"
        belady = scopes["belady"][scope]
        lines.append(f"| {label} | " + " | ".join(f"{scopes[n][scope]:.4f}" for n in names) + " | "
                     + " | ".join(f"{scopes[n][scope] / belady:.3f}" for n in names[:-1]) + " |")
    lines += ["", "Look-ahead: requests announced ahead to the engram policy (1 = the next step's fetch alone; "
              "7 = with the trainer's 6 announced steps, the default; 0 = none).", "",
              "| announced | " + " | ".join(f"order {s}" if s != "layer" else "whole layer" for s in scopes["belady"])
              + " | whole layer / belady |", "|---" * (len(scopes["belady"]) + 2) + "|"]
    for k in sorted(curve):
        lines.append(f"| {k} | " + " | ".join(f"{curve[k][s]:.4f}" for s in scopes["belady"])
                     + f" | {curve[k]['layer'] / scopes['belady']['layer']:.3f} |")
    fraction, rate, short, probes = search
    layer = {n: scopes[n]["layer"] / scopes["belady"]["layer"] for n in names}
    enough = [k for k in sorted(curve) if curve[k]["layer"] >= args.belady_share * scopes["belady"]["layer"]]
    beaten = [n for n in ("static", "lfu") if layer["engram"] > layer[n]]
    every_table = all(per_table["engram"][h] > max(per_table[n][h] for n in BASELINES)
                      for h in range(len(trace.tables)))
    lines += ["", f"Reading: over the layer, the static top-C reaches {layer['static']:.3f} of Belady and plain LFU "
              f"{layer['lfu']:.3f}; the engram policy with {args.lookahead} announced request(s) "
              f"{layer['engram']:.3f}, above {' and '.join(beaten) or 'neither'}; it beats LFU, LRU and random in "
              f"{'every table' if every_table else 'not every table'}. "
              + (f"{args.belady_share:.0%} of Belady takes {enough[0]} announced requests." if enough else
                 f"No look-ahead in {sorted(curve)} reaches {args.belady_share:.0%} of Belady.")]
    lines += ["", f"Hot fraction for a {args.target:.0%} whole-layer hit rate (engram, look-ahead {args.lookahead}): "
              f"{fraction:.3f} of touched rows (hit rate {rate:.4f} there; {short:.3f} fell short; {probes} probes).",
              f"Plan cost (engram, table 0, measured epoch): median {cost['plan_ms_median']:.2f} ms for "
              f"{cost['ids_per_plan_median']} ids (resident + just read) = {cost['plan_ms_per_1k_ids']:.3f} ms per "
              "1000 ids."]
    return lines


def cold_section(args) -> tuple[dict, list[str]]:
    """Cold reads rows/s batched vs getmulti vs one transaction per row (`cold_batched_speedup`,
    `cold_vs_floor`), measured by bench/tiers_cold.py."""
    from tiers_cold import measure_cold_reads  # bench/ is on sys.path when run as a script

    r = measure_cold_reads(num_rows=args.cold_rows)
    lines = ["", f"Cold reads (bench/tiers_cold.py): {r['request']:,} distinct random rows of {r['rows']:,} "
             f"({r['record_bytes']} B records, LMDB file in the page cache), best of 5 rounds.", "",
             "| read | rows/s | batched / this |", "|---|---|---|"]
    for label, key in (("batched (DiskTier.get)", "batched_rows_per_s"), ("getmulti floor", "getmulti_rows_per_s"),
                       ("one transaction + decode per row", "naive_rows_per_s"),
                       ("one transaction + get per row, no decode", "naive_get_rows_per_s")):
        lines.append(f"| {label} | {r[key]:,.0f} | {r['batched_rows_per_s'] / r[key]:.2f} |")
    lines += ["", f"cold_batched_speedup {r['cold_batched_speedup']:.2f} (>= 3 wanted), cold_vs_floor "
              f"{r['cold_vs_floor']:.2f} (>= 0.67 wanted)."]
    return {k: r[k] for k in ("cold_batched_speedup", "cold_vs_floor", "batched_rows_per_s",
                              "getmulti_rows_per_s", "naive_rows_per_s")}, lines


def service_section(args, trace: RowTrace, sizes: list[int]) -> tuple[dict, list[str]]:
    """The trace replayed through real clusters in one embedded Ray: 1 hot + 2 cold shards (LMDB
    under the cold shards' DRAM), the hot shard holding `hot_rows` per table, against 2 all-DRAM
    shards alone. The hot tier's hit rate comes from the shards' Stats counters over the measured
    epoch, beside the offline replay of the same policy at the same capacity; fetch rows/s of
    the two clusters on the same request stream give `service_vs_dram`."""
    # One budget for every table (ClusterConfig.hot_rows): the mean of the per-table capacities,
    # which differ by < 10% (order 2 vs 3); the offline figure uses the same capacity.
    hot_rows = round(float(np.mean(capacities(trace, args.hot_fraction))))
    offline = aggregate(trace, policy_rates(trace, "engram", [hot_rows] * len(trace.tables), args.lookahead))["layer"]
    owns_ray = init_local_ray()
    try:
        with tempfile.TemporaryDirectory() as lmdb_dir:
            hot = serve_trace(ClusterConfig(num_shards=2, num_hot=1, hot_rows=hot_rows, name="bench-tiers-hot",
                                            migrate_max_duty=args.migrate_max_duty,
                                            migrate_interval_s=args.migrate_interval_s,
                                            storage=StorageConfig(path=lmdb_dir)), trace, sizes, args.lookahead,
                              args.service_step_s)
        dram = serve_trace(ClusterConfig(num_shards=2, name="bench-tiers-dram"), trace, sizes, args.lookahead,
                           args.service_step_s)
    finally:
        if owns_ray:
            ray.shutdown()
    hit_rate = hot["hits"]["hot"] / sum(hot["reads"].values())
    result = {"service_hot_hit_rate": hit_rate, "service_offline_hit_rate": offline,
              "service_fetch_rows_per_s": hot["rows_per_s"], "dram_fetch_rows_per_s": dram["rows_per_s"],
              "service_vs_dram": hot["rows_per_s"] / dram["rows_per_s"],
              "service": {"split_fraction": args.service_split_fraction, "steps_per_epoch": trace.steps_per_epoch,
                          "hot_rows": hot_rows, "migrate_max_duty": args.migrate_max_duty,
                          "migrate_interval_s": args.migrate_interval_s,
                          "reads_over_trace": sum(hot["reads"].values()) / trace_reads(trace),
                          "hot_cold": hot, "dram": dram}}
    return result, service_report(args, trace, result)


def serve_trace(config: ClusterConfig, trace: RowTrace, sizes: list[int], lookahead: int,
                step_s: float) -> dict:
    """Replays `trace` through a tables cluster of `config` (launched here, shut down after): the
    trainer's tables created, every row the trace reads written once (`write_rows`), the warm-up
    epoch, then the measured one between two Stats snapshots. Returns the measured
    epoch's fetch rows/s, per shard role the ids read and the memory tier's hits, the client's
    re-sends after RowsMoved, and the migrator's rounds and moves."""
    cluster = launch(config)
    try:
        with cluster.client() as client:
            names = create_tables(client, sizes)
            write_rows(client, names, trace)
            steps = trace.steps_per_epoch
            replay(client, names, trace, range(steps), lookahead, step_s)
            before, moves, refreshes = client.report(), migration(cluster), client.refreshes
            rows, seconds = replay(client, names, trace, range(steps, 2 * steps), lookahead, step_s)
            after, refreshes = client.report(), client.refreshes - refreshes
            moves = {k: v - moves[k] for k, v in migration(cluster).items()}
    finally:
        cluster.shutdown()
    reads, hits = tier_counts(after, before)
    return {"rows_per_s": rows / seconds, "seconds": seconds, "rows": rows, "reads": reads, "hits": hits,
            "refreshes": refreshes, "migration": moves}


def create_tables(client, sizes: list[int]) -> list[str]:
    """Creates the tiny preset's first Engram layer's tables as training does (names, seeds,
    optimizer); returns their names in the trace's table order."""
    cfg = TrainConfig()
    layer = cfg.model.engram.layer_ids[0]
    tables = RemoteTables(client, cfg.model.engram, {layer: sizes}, table_optimizer_config(cfg)).create()
    tables.close()
    return tables.names[layer]


def write_rows(client, names: list[str], trace: RowTrace) -> None:
    """Every row the trace reads, written as table step 1 with zero gradients (Adam leaves the
    values as they were): training writes each row it reads, and a hot shard moves only written
    rows (a never-written row is computed from its seed wherever it is read)."""
    ids = {name: np.unique(np.concatenate(batches)) for name, batches in zip(names, trace.tables)}
    width = client.table(names[0]).width
    client.push({name: (i, np.zeros((len(i), width), np.float32)) for name, i in ids.items()}, step=1)


def replay(client, names: list[str], trace: RowTrace, steps: range, lookahead: int,
           step_s: float) -> tuple[int, float]:
    """Fetches `steps` of the trace in order, each fetch `step_s` seconds after the previous one
    began (or when it ended, if later): the trainer's compute between fetches, while the migrator
    runs. Returns (rows fetched, seconds spent in fetches). Before step s's fetch the rows of step
    s + lookahead are announced (step 0 announces steps 1..lookahead), so placement always knows
    the next `lookahead` requests. The trainer's Prefetcher tells the shards the same 7 requests
    (lookahead 7): the next step's fetch, held until this step's push, and 6 announced steps;
    without pushes nothing can be held, so that one is announced too (both reach placement
    through Shard._expect). Each announcement carries its step, as the trainer's do, so placement
    merges the parts the three shards got into one request per step."""
    rows, seconds, last = 0, 0.0, len(trace.tables[0]) - 1
    due = time.perf_counter()
    for s in steps:
        time.sleep(max(0.0, due - time.perf_counter()))
        due = time.perf_counter() + step_s
        ahead = range(s + 1 if s == 0 else s + lookahead, min(s + lookahead, last) + 1)
        announced = [client.announce(step_ids(names, trace, a), step=a) for a in ahead]
        ids = step_ids(names, trace, s)
        start = time.perf_counter()
        client.fetch(ids)
        seconds += time.perf_counter() - start
        rows += sum(len(i) for i in ids.values())
        for future in announced:
            future.result()
    return rows, seconds


def step_ids(names: list[str], trace: RowTrace, step: int) -> dict[str, np.ndarray]:
    return {name: batches[step] for name, batches in zip(names, trace.tables)}


def trace_reads(trace: RowTrace) -> int:
    """Ids the measured epoch fetches (distinct per step and table)."""
    return sum(num_reads(batches, trace.steps_per_epoch) for batches in trace.tables)


def migration(cluster) -> dict:
    """The hot shards' migration counters, summed (empty without hot shards)."""
    counters = ray.get([a.migration_counters.remote() for a in cluster.hot_actors])
    if any(c["error"] for c in counters):
        raise RuntimeError(f"migration failed: {[c['error'] for c in counters]}")
    return {k: sum(c[k] for c in counters) for k in ("rounds", "promoted", "demoted")} if counters else {}


def tier_counts(after, before) -> tuple[dict[str, int], dict[str, int]]:
    """Between two ClusterReports, per shard role: ids read, and those the shard's memory tier
    held (all of a hot shard's: only written rows move there; a cold shard's DRAM over LMDB)."""
    reads, hits = {}, {}
    for report, sign in ((after, 1), (before, -1)):
        for shard in report.shards:
            for table in shard.tables:
                memory = sum(t.hits for t in table.tiers if t.tier in (DRAM_TIER, DEVICE_TIER))
                reads[shard.role] = reads.get(shard.role, 0) + sign * table.rows_read
                hits[shard.role] = hits.get(shard.role, 0) + sign * memory
    return reads, hits


def service_report(args, trace: RowTrace, r: dict) -> list[str]:
    s = r["service"]
    hot, dram = s["hot_cold"], s["dram"]
    steps = trace.steps_per_epoch
    return ["", "Through the service: 1 hot + 2 cold shards vs 2 all-DRAM shards (one embedded Ray, real gRPC).", "",
            f"Trace: train split x {args.service_split_fraction:g} ({steps} steps per epoch), every row it reads "
            f"written once first (no pushes after), then fetched step by step by one client, a step every "
            f"{args.service_step_s:g} s, each after announcing the step {args.lookahead} ahead (what the trainer's "
            f"held next-step fetch and 6 announced steps tell placement). Hot shard: {s['hot_rows']:,} rows per table "
            f"({args.hot_fraction:.0%} of the mean rows a table touches), engram policy, migrator duty cap "
            f"{args.migrate_max_duty:g} (service default 0.05), rounds at least {args.migrate_interval_s:g} s apart "
            f"(service default 0.05); cold shards: DRAM (default budget) over LMDB.", "",
            "| measured epoch | hot hit rate | fetch rows/s | seconds in fetches | RowsMoved re-sends | "
            "migration rounds | rows promoted |", "|---|---|---|---|---|---|---|",
            f"| 1 hot + 2 cold (LMDB) | {r['service_hot_hit_rate']:.4f} | {hot['rows_per_s']:,.0f} | "
            f"{hot['seconds']:.1f} | {hot['refreshes']} | {hot['migration']['rounds']} | "
            f"{hot['migration']['promoted']:,} |",
            f"| 2 all-DRAM | - | {dram['rows_per_s']:,.0f} | {dram['seconds']:.1f} | {dram['refreshes']} | - | - |", "",
            f"Hot hit rate through the service {r['service_hot_hit_rate']:.4f} (hot shard's hits / ids read by all "
            f"shards) vs {r['service_offline_hit_rate']:.4f} replayed offline (same trace, policy, capacity, "
            f"look-ahead): {r['service_hot_hit_rate'] / r['service_offline_hit_rate']:.3f} of it. Offline, the "
            f"policy plans after every request; the service's migrator plans once a round, on a background thread, "
            f"seeing the reads of every step since its last round, moves a bounded batch per table, and its hot set lags the plan "
            f"({hot['migration']['rounds'] / steps:.2f} rounds per step here). The shards counted "
            f"{s['reads_over_trace']:.3f}x the trace's reads: a shard's request refused because rows moved is "
            f"re-sent alone, to the rows' new homes (the client's hot-map refreshes count them).",
            f"Fetch rows/s, hot/cold service / all-DRAM shards: {r['service_vs_dram']:.2f} "
            f"({hot['refreshes'] / steps:.2f} refused requests re-sent per step, LMDB-backed cold shards, the "
            f"migrator's CPU on the same 2 cores)."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hot-fraction", type=float, default=0.1, help="share of each table's touched rows held hot")
    parser.add_argument("--lookahead", type=int, default=7,
                        help="requests placement sees ahead: the next step's fetch + the trainer's 6 announced steps")
    parser.add_argument("--lookahead-curve", type=lambda s: [int(k) for k in s.split(",")], default=[0, 1, 2, 4, 7, 8])
    parser.add_argument("--cold-rows", type=int, default=1_000_000, help="records in the cold-read table")
    parser.add_argument("--target", type=float, default=0.9, help="hit rate the hot-fraction search aims at")
    parser.add_argument("--belady-share", type=float, default=0.85, help="share of Belady the curve is checked at")
    parser.add_argument("--split-fraction", type=float, default=1.0, help="prefix of the train split replayed")
    parser.add_argument("--service-split-fraction", type=float, default=0.125,
                        help="prefix of the train split replayed through the service")
    parser.add_argument("--service-step-s", type=float, default=0.25,
                        help="seconds from one step's fetch to the next in the service replay (the trainer's compute)")
    parser.add_argument("--migrate-max-duty", type=float, default=1.0,
                        help="hot shard migrator's wall-clock share in the service replay (service default 0.05)")
    parser.add_argument("--migrate-interval-s", type=float, default=0.05,
                        help="least seconds between the migrator's rounds in the service replay (service default 0.05)")
    parser.add_argument("--skip-service", action="store_true", help="no replay through the service")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tiers_policy")
    args = parser.parse_args(argv)
    if not 0 < args.hot_fraction < 1 or not 0 < args.split_fraction <= 1 or not 0 < args.service_split_fraction <= 1:
        parser.error(f"--hot-fraction {args.hot_fraction} must be in (0, 1), --split-fraction "
                     f"{args.split_fraction} and --service-split-fraction {args.service_split_fraction} in (0, 1]")
    if not 0 < args.migrate_max_duty <= 1 or args.service_step_s < 0 or args.migrate_interval_s <= 0:
        parser.error(f"--migrate-max-duty {args.migrate_max_duty} must be in (0, 1], --service-step-s "
                     f"{args.service_step_s} >= 0, --migrate-interval-s {args.migrate_interval_s} > 0")
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    trace, sizes = load_trace(args, args.split_fraction)
    summary, lines = placement_section(args, trace)
    cold, cold_lines = cold_section(args)
    summary |= cold
    lines += cold_lines
    if not args.skip_service:
        if args.service_split_fraction != args.split_fraction:
            trace, sizes = load_trace(args, args.service_split_fraction)
        service, service_lines = service_section(args, trace, sizes)
        summary |= service
        lines += service_lines
    lines.append(f"Bench time: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text, summary if args.json else None)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
