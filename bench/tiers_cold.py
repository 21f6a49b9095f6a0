"""Cold-tier reads: rows/s of one request's rows read from a cold shard's LMDB file three ways.

- batched: `DiskTier.get` (one read transaction, ids deduplicated and sorted, getmulti in chunks,
  values decoded with numpy into row, state and last arrays in request order), what a cold shard
  does for a fetch's DRAM misses;
- floor: py-lmdb's `Cursor.getmulti` over the same ids' sorted keys in one transaction, keys
  prepared beforehand and nothing decoded (the issue's floor). The batched read looks its keys up
  with LMDB's get from a C loop instead, which skips getmulti's key copy and tuple per row, so it
  can match or pass this floor; its own lookups alone (`map(txn.get, keys)`, nothing joined or
  decoded) are printed too, as the floor of what it does;
- naive: one read transaction per row (`txn.get`) and a per-row decode into the same arrays, what
  a cold tier without batching does (the per-row Python and transaction overhead peers report).
  Also printed: the naive reads alone (a transaction and a get per row, nothing decoded), so the
  speedup can be read against the bare per-row lookups too.

All three read the same rows of the same file (in the page cache: it was just written), in
alternating rounds; each figure is the best round. The naive result is checked equal to the
batched one. Ratios: cold_batched_speedup = batched / naive, cold_vs_floor = batched / floor
(the issue's acceptance: >= 3 and >= 1 / 1.5).

    python bench/tiers_cold.py [--rows 1000000] [--request 16384] [--width 64] [--json]

bench/bench_tiers.py calls `measure_cold_reads` for its cold-read figures.
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
from memory_service.storage.tiers.disk import DiskEnvironment, DiskTier, record_dtype  # noqa: E402


def fill(tier: DiskTier, num_rows: int, rng: np.random.Generator, batch: int = 100_000) -> np.ndarray:
    """Writes `num_rows` random records (ids spread over 100x as many) and returns their ids."""
    ids = np.unique(rng.integers(0, 100 * num_rows, int(num_rows * 1.02)))[:num_rows]
    ids = rng.permutation(ids)
    for start in range(0, num_rows, batch):
        part = ids[start:start + batch]
        tier.put(part, rng.standard_normal((len(part), tier.width)).astype(np.float32),
                 rng.standard_normal((len(part), tier.state_width)).astype(np.float32),
                 rng.integers(0, 10**6, len(part)))
    return ids


def read_naive(tier: DiskTier, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One transaction and one decode per row, into the arrays the batched read returns."""
    record = record_dtype(tier.width, tier.state_width)
    found = np.zeros(len(ids), dtype=bool)
    rows = np.empty((len(ids), tier.width), dtype=np.float32)
    state = np.empty((len(ids), tier.state_width), dtype=np.float32)
    last = np.empty(len(ids), dtype=np.int64)
    env, db = tier.environment.env, tier._rows_db
    for i, row_id in enumerate(ids.tolist()):
        with env.begin(db=db) as txn:
            value = txn.get(row_id.to_bytes(8, "big"))
        if value is not None:
            r = np.frombuffer(value, dtype=record)[0]
            found[i] = True
            rows[i], state[i], last[i] = r["row"], r["state"], r["last"]
    return found, rows[found], state[found], last[found]


def read_naive_get(tier: DiskTier, keys: list[bytes]) -> list:
    """One transaction and one get per row, values left undecoded."""
    env, db = tier.environment.env, tier._rows_db
    out = []
    for key in keys:
        with env.begin(db=db) as txn:
            out.append(txn.get(key))
    return out


def read_floor(tier: DiskTier, keys: list[bytes]) -> list:
    env, db = tier.environment.env, tier._rows_db
    with env.begin(db=db) as txn:
        return txn.cursor().getmulti(keys)


def read_gets(tier: DiskTier, keys: list[bytes]) -> list:
    """The batched read's lookups alone: LMDB's get per sorted key from a C loop, one transaction."""
    env, db = tier.environment.env, tier._rows_db
    with env.begin(db=db) as txn:
        return list(map(txn.get, keys))


def measure_cold_reads(path: str | None = None, num_rows: int = 1_000_000, request: int = 16384,
                       width: int = 64, state_width: int = 128, rounds: int = 5, seed: int = 0) -> dict:
    """Rows/s of the batched, floor and naive reads of one `request` of distinct stored ids from a
    table of `num_rows` records (row `width` + `state_width` float32 + last step), in an LMDB
    environment at `path` (a temporary directory when None); see the module docstring."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        env = DiskEnvironment(path or tmp, map_bytes=1 << 30)
        tier = env.open_table("bench", {}, width, state_width)
        start = time.perf_counter()
        ids = fill(tier, num_rows, rng)
        fill_s = time.perf_counter() - start
        asked = rng.choice(ids, request, replace=False)  # unsorted, as a fetch arrives
        keys = np.sort(asked).astype(">i8").view("V8").tolist()
        batched = tier.get(asked)
        naive = read_naive(tier, asked)
        for a, b in zip(batched, naive):
            np.testing.assert_array_equal(a, b)
        assert len(read_floor(tier, keys)) == request and batched[0].all()
        best = {"batched": np.inf, "floor": np.inf, "gets": np.inf, "naive": np.inf, "naive_get": np.inf}
        asked_keys = asked.astype(">i8").view("V8").tolist()
        for _ in range(rounds):
            for name, fn in (("batched", lambda: tier.get(asked)), ("floor", lambda: read_floor(tier, keys)),
                             ("gets", lambda: read_gets(tier, keys)),
                             ("naive", lambda: read_naive(tier, asked)),
                             ("naive_get", lambda: read_naive_get(tier, asked_keys))):
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        file_bytes = env.used_bytes
        env.close()
    rate = {name: request / seconds for name, seconds in best.items()}
    return {"rows": num_rows, "request": request, "width": width, "state_width": state_width,
            "record_bytes": record_dtype(width, state_width).itemsize, "file_bytes": file_bytes,
            "fill_rows_per_s": num_rows / fill_s,
            "batched_rows_per_s": rate["batched"], "getmulti_rows_per_s": rate["floor"],
            "gets_rows_per_s": rate["gets"],
            "naive_rows_per_s": rate["naive"], "naive_get_rows_per_s": rate["naive_get"],
            "cold_batched_speedup": rate["batched"] / rate["naive"],
            "cold_vs_floor": rate["batched"] / rate["floor"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--request", type=int, default=16384)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--state-width", type=int, default=128, help="128: Adam's two moments of width 64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--path", default=None, help="LMDB directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure_cold_reads(args.path, args.rows, args.request, args.width, args.state_width, args.rounds)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(f"cold reads: {args.request:,} distinct random rows of {args.rows:,} "
          f"({r['record_bytes']} B records, {r['file_bytes'] / 2**20:,.0f} MiB LMDB file in page cache)")
    print(f"{'read':<34}{'rows/s':>12}{'vs floor':>10}")
    for label, key in (("batched (DiskTier.get)", "batched_rows_per_s"),
                       ("floor: getmulti, one txn, no decode", "getmulti_rows_per_s"),
                       ("  batched's lookups alone (C gets)", "gets_rows_per_s"),
                       ("naive: one txn + decode per row", "naive_rows_per_s"),
                       ("  its txn + get alone, no decode", "naive_get_rows_per_s")):
        print(f"{label:<34}{r[key]:>12,.0f}{r[key] / r['getmulti_rows_per_s']:>10.2f}")
    print(f"cold_batched_speedup (batched / naive) {r['cold_batched_speedup']:.2f}x, "
          f"cold_vs_floor (batched / getmulti) {r['cold_vs_floor']:.2f}")


if __name__ == "__main__":
    main()
