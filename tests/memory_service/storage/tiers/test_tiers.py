"""Storage tiers: each tier's get/put/pop against a plain dict on random batches, the slot index
with removals, the DRAM arena's row budget, LMDB map growth, and a disk environment reopened from
its files recovering rows, state and step log bit for bit."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from memory_service.ids import SlotIndex
from memory_service.storage.tiers import DiskEnvironment, DramTier, RowRecords
from memory_service.storage.tiers import disk as disk_tier
from memory_service.storage.tiers.device import DeviceTier

WIDTH, STATE = 5, 10
KINDS = ["dram", "device", "disk", "disk-chunked", pytest.param("device-cuda", marks=pytest.mark.gpu)]


def make_tier(kind: str, tmp_path, width: int = WIDTH, state: int = STATE):
    if kind == "dram":
        return DramTier(width, state)
    if kind.startswith("device"):
        return DeviceTier(width, state, device="cuda" if kind == "device-cuda" else "cpu")
    return DiskEnvironment(str(tmp_path / "lmdb"), map_bytes=1 << 20).open_table("t", {}, width, state)


@pytest.fixture
def chunked(kind, monkeypatch):
    """disk-chunked: the disk tier reads and writes in chunks of 7 keys, so requests cross chunk
    boundaries with ids missing from some chunks (4096-key chunks at the real size)."""
    if kind == "disk-chunked":
        monkeypatch.setattr(disk_tier, "_CHUNK", 7)


def random_records(rng, ids: np.ndarray, width: int = WIDTH, state: int = STATE) -> RowRecords:
    return RowRecords(ids, rng.standard_normal((len(ids), width)).astype(np.float32),
                      rng.standard_normal((len(ids), state)).astype(np.float32),
                      rng.integers(0, 10**6, len(ids)))


def check_equal(records: RowRecords, ref: dict[int, tuple]) -> None:
    """Each record bit-identical to the reference's (row, state, last) of its id."""
    for field, k in (("rows", 0), ("state", 1), ("last", 2)):
        expected = np.array([ref[int(i)][k] for i in records.ids]).reshape(getattr(records, field).shape)
        np.testing.assert_array_equal(getattr(records, field), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_tier_matches_a_dict(kind, tmp_path, chunked):
    """200 random batches of put (insert and overwrite), get (repeats or distinct, absent ids)
    and pop."""
    tier = make_tier(kind, tmp_path)
    ref: dict[int, tuple] = {}
    rng = np.random.default_rng(1)
    for _ in range(200):
        op = rng.choice(["put", "put", "get", "pop"])
        if op == "get":
            size = rng.integers(0, 400)
            ids = (rng.integers(0, 3000, size) if rng.random() < 0.5  # repeats and absent ids
                   else rng.permutation(3000)[:size].astype(np.int64))  # distinct, absent ids
            found, rows, state, last = tier.get(ids)
            np.testing.assert_array_equal(found, [int(i) in ref for i in ids])
            check_equal(RowRecords(ids[found], rows, state, last), ref)
            continue
        ids = rng.permutation(3000)[: rng.integers(0, 400)].astype(np.int64)  # distinct, unsorted
        if op == "put":
            records = random_records(rng, ids)
            tier.put(records.ids, records.rows, records.state, records.last)
            for i, r, s, t in zip(ids, records.rows, records.state, records.last):
                ref[int(i)] = (r.copy(), s.copy(), int(t))
        else:
            expected = [int(i) for i in ids if int(i) in ref]
            popped = tier.pop(ids)
            assert popped.ids.tolist() == expected  # found ids, in the order asked
            check_equal(popped, ref)
            for i in expected:
                del ref[i]
        assert len(tier) == len(ref)
    assert sorted(tier.ids().tolist()) == sorted(ref)
    found, rows, state, last = tier.get(np.array(sorted(ref), dtype=np.int64))
    assert found.all()
    check_equal(RowRecords(np.array(sorted(ref)), rows, state, last), ref)


def test_slot_index_with_removals_matches_a_dict():
    """Inserts, removals (tombstones) and moves in random batches; lookups agree with a dict
    throughout, across growth and tombstone sweeps."""
    index, ref = SlotIndex(), {}
    rng = np.random.default_rng(2)
    for _ in range(300):
        held = np.array(list(ref), dtype=np.int64)
        if rng.random() < 0.5 or not len(held):
            new = np.setdiff1d(rng.integers(0, 10**12, rng.integers(1, 200)), held)
            new = rng.permutation(new)
            slots = rng.integers(0, 10**6, len(new))
            index.insert(new, slots)
            ref.update(zip(new.tolist(), slots.tolist()))
        elif rng.random() < 0.7:
            gone = rng.choice(held, size=rng.integers(1, len(held) + 1), replace=False)
            index.remove(gone)
            for i in gone.tolist():
                del ref[i]
        else:
            moved = rng.choice(held, size=rng.integers(1, len(held) + 1), replace=False)
            slots = rng.integers(0, 10**6, len(moved))
            index.move(moved, slots)
            ref.update(zip(moved.tolist(), slots.tolist()))
        probe = np.concatenate([np.array(list(ref), dtype=np.int64), rng.integers(0, 10**12, 50)])
        np.testing.assert_array_equal(index.lookup(probe), [ref.get(int(i), -1) for i in probe])
        assert index.size == len(ref)


@pytest.mark.parametrize("kind", ["dram", "device"])
def test_arena_row_limit_holds_its_budget(kind):
    """A tier sized by rows_within(budget) takes that many rows and stays within the budget
    through churn (pops move the tail into holes, tombstones are swept at the same size)."""
    budget = 1 << 20
    max_rows = DramTier.rows_within(budget, WIDTH, STATE)
    # 77 bytes of arenas per row plus the index: 2 to 4 buckets of 16 bytes per row (a power of 2)
    assert budget // (77 + 64) <= max_rows <= budget // (77 + 32)
    tier = DramTier(WIDTH, STATE, max_rows) if kind == "dram" else DeviceTier(WIDTH, STATE, max_rows, "cpu")
    rng = np.random.default_rng(3)
    ids = rng.permutation(10**6)[:max_rows].astype(np.int64)
    r = random_records(rng, ids)
    tier.put(r.ids, r.rows, r.state, r.last)
    assert len(tier) == max_rows and tier.nbytes <= budget
    one = random_records(rng, np.array([10**7]))
    with pytest.raises(ValueError, match="tier full"):
        tier.put(one.ids, one.rows, one.state, one.last)
    for _ in range(20):  # churn: pop a batch, put a new one
        tier.pop(rng.choice(tier.ids(), 5000, replace=False))
        new = np.setdiff1d(rng.integers(0, 10**7, 6000), tier.ids())[:5000]
        r = random_records(rng, new)
        tier.put(r.ids, r.rows, r.state, r.last)
        assert tier.nbytes <= budget
    tier.set_max_rows(len(tier))  # shrinking to the rows held reallocates arenas and index
    assert tier.nbytes <= budget


def test_disk_map_grows_when_full(tmp_path):
    """20k records of 776 bytes (15 MB) into a 1 MiB map: the map doubles until they fit, each
    failed transaction retried, and every record reads back exactly."""
    env = DiskEnvironment(str(tmp_path / "lmdb"), map_bytes=1 << 20)
    tier = env.open_table("t", {}, 64, 128)
    rng = np.random.default_rng(4)
    ids = rng.permutation(np.unique(rng.integers(0, 10**8, 21_000))[:20_000])
    records = random_records(rng, ids, 64, 128)
    for part in np.array_split(np.arange(len(ids)), 4):
        tier.put(*(getattr(records, f)[part] for f in ("ids", "rows", "state", "last")))
    assert env.map_growths >= 4 and env.map_size >= 15e6
    found, rows, state, last = tier.get(ids)
    assert found.all()
    np.testing.assert_array_equal(rows, records.rows)
    np.testing.assert_array_equal(state, records.state)
    np.testing.assert_array_equal(last, records.last)


def test_disk_environment_reopens_with_rows_state_and_step_log(tmp_path):
    path = str(tmp_path / "lmdb")
    env = DiskEnvironment(path)
    env.check_shard(1, 3)
    a, b = env.open_table("a", {"config": {"x": 1}}, 4, 8), env.open_table("b" * 256, {"config": {}}, 2, 0)
    rng = np.random.default_rng(5)
    ra, rb = random_records(rng, np.arange(0, 1000, 3), 4, 8), random_records(rng, np.arange(500), 2, 0)
    a.put(ra.ids, ra.rows, ra.state, ra.last, log=(1, 0.5))
    a.save_log(np.array([2, 4]), np.array([0.25, 0.125]))
    b.put(rb.ids, rb.rows, rb.state, rb.last)
    env.close()

    env = DiskEnvironment(path)
    env.check_shard(1, 3)
    with pytest.raises(ValueError, match="holds shard 1 of 3, not shard 0 of 3"):
        env.check_shard(0, 3)
    assert env.tables() == {"a": {"config": {"x": 1}}, "b" * 256: {"config": {}}}
    a = env.open_table("a", {"config": {"x": 1}}, 4, 8)
    for tier, ref in ((a, ra), (env.open_table("b" * 256, {"config": {}}, 2, 0), rb)):
        scanned = RowRecords.concat(list(tier.scan(chunk=64)))
        for f in ("ids", "rows", "state", "last"):
            np.testing.assert_array_equal(getattr(scanned, f), getattr(ref, f))
    steps, lrs = a.load_log()
    np.testing.assert_array_equal(steps, [1, 2, 4])
    np.testing.assert_array_equal(lrs, [0.5, 0.25, 0.125])
    env.drop_table("a")
    assert list(env.tables()) == ["b" * 256]
    assert len(env.open_table("a", {}, 4, 8)) == 0  # a new table of the same name starts empty


def test_measure_cold_reads_on_a_small_file(tmp_path):
    """The cold-read benchmark's function runs (its three readers agree: it checks that) and
    reports ratios consistent with its rates; speeds are printed by the benchmark, not asserted."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "bench"))
    from tiers_cold import measure_cold_reads

    r = measure_cold_reads(str(tmp_path / "lmdb"), num_rows=5000, request=1000, rounds=1)
    assert r["cold_batched_speedup"] == r["batched_rows_per_s"] / r["naive_rows_per_s"]
    assert r["cold_vs_floor"] == r["batched_rows_per_s"] / r["getmulti_rows_per_s"]
    assert r["record_bytes"] == 64 * 4 + 128 * 4 + 8 and r["file_bytes"] > 5000 * r["record_bytes"]
