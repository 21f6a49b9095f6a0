"""Hot and cold tiers on the training stream. Placement (this file's own section): the hot-tier hit
rate of each placement policy next to Belady's optimum, per N-gram order and over the layer.

The trace is what the tiny preset's Engram layer reads on the corpus's train split in the training
loader's order (trainer/row_trace.py): 256-token sequences shuffled each epoch, 16 per step, row
ids deduplicated per step and table; one epoch of warm-up, then one measured epoch. Each table has
its own tier and policy, holding `--hot-fraction` of the rows that table touches in the measured
epoch (per table, for every policy and for Belady alike). Admission is on demand (a row comes in
right after a read of it), the service's semantics (memory_service/placement.py).

Beside the policies: Belady's MIN (offline, the ceiling with these semantics) and the static top-C
(the rows the measured epoch reads most, known in advance and held fixed): on shuffled batches,
reads are exchangeable, so frequency is the only signal an online policy has and the static top-C
is about what frequency alone reaches. Past it, only the look-ahead helps: the rows of announced
requests. The service sees 7 (the next step's held fetch and the 6 steps after it, which the trainer
announces: trainer/prefetch.py); the curve shows what fewer or more give.
Also the hot fraction at which the policy reaches a 90% hit rate, and what one plan costs.

    PYTHONPATH=. python bench/bench_tiers.py --json     # ~10 min on one core
    PYTHONPATH=. python bench/bench_tiers.py --split-fraction 0.125 --lookahead-curve 1  # ~1 min
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from memory_service.placement import Policy, make_policy
from memory_service.placement_replay import belady_hit_rate, num_reads, simulate
from trainer.data import Corpus, CorpusConfig
from trainer.row_trace import RowTrace
from trainer.train import TrainConfig, build_indexer
from report import write_results  # bench/report.py (bench/ is on sys.path when run as a script)

BASELINES = ("lfu", "lru", "random")
WARMUP_EPOCH, MEASURED_EPOCH = 0, 1


def load_trace(args) -> RowTrace:
    """Two epochs of the tiny preset's first Engram layer on (a prefix of) the train split."""
    corpus = Corpus.load(CorpusConfig())
    cfg = TrainConfig()
    indexer = build_indexer(cfg, corpus)
    tokens = corpus.train[: int(len(corpus.train) * args.split_fraction)]
    return RowTrace.from_tokens(tokens, indexer, cfg.model.engram.layer_ids[0], context=args.context,
                                batch_size=args.batch_size, epochs=2, seed=args.seed)


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

    def expect(self, ids):
        self.inner.expect(ids)

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
    for label, key in (("batched (ColdTier.get)", "batched_rows_per_s"), ("getmulti floor", "getmulti_rows_per_s"),
                       ("one transaction + decode per row", "naive_rows_per_s"),
                       ("one transaction + get per row, no decode", "naive_get_rows_per_s")):
        lines.append(f"| {label} | {r[key]:,.0f} | {r['batched_rows_per_s'] / r[key]:.2f} |")
    lines += ["", f"cold_batched_speedup {r['cold_batched_speedup']:.2f} (>= 3 wanted), cold_vs_floor "
              f"{r['cold_vs_floor']:.2f} (>= 0.67 wanted)."]
    return {k: r[k] for k in ("cold_batched_speedup", "cold_vs_floor", "batched_rows_per_s",
                              "getmulti_rows_per_s", "naive_rows_per_s")}, lines


def service_section(args) -> dict:
    """Fetch rows/s of the hot/cold service vs all-DRAM cold shards. Empty until the service
    with hot shards lands."""
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hot-fraction", type=float, default=0.1, help="share of each table's touched rows held hot")
    parser.add_argument("--lookahead", type=int, default=7,
                        help="requests placement sees ahead: the next step's fetch + the trainer's 6 announced steps")
    parser.add_argument("--lookahead-curve", type=lambda s: [int(k) for k in s.split(",")], default=[0, 1, 2, 4, 7, 8])
    parser.add_argument("--cold-rows", type=int, default=1_000_000, help="records in the cold-read table")
    parser.add_argument("--target", type=float, default=0.9, help="hit rate the hot-fraction search aims at")
    parser.add_argument("--belady-share", type=float, default=0.85, help="share of Belady the curve is checked at")
    parser.add_argument("--split-fraction", type=float, default=1.0, help="prefix of the train split replayed")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tiers_policy")
    args = parser.parse_args()
    if not 0 < args.hot_fraction < 1 or not 0 < args.split_fraction <= 1:
        parser.error(f"--hot-fraction {args.hot_fraction} must be in (0, 1), --split-fraction "
                     f"{args.split_fraction} in (0, 1]")
    start = time.perf_counter()
    trace = load_trace(args)
    summary, lines = placement_section(args, trace)
    cold, cold_lines = cold_section(args)
    summary |= cold | service_section(args)
    lines += cold_lines
    lines.append(f"Bench time: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text, summary if args.json else None)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
