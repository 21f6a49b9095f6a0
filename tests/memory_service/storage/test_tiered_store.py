"""TableStore over tiers: a tiny DRAM budget over LMDB, with background placement moving rows all
the time, reads and ends bit-identical to an all-DRAM store given the same requests; a push larger
than the budget stays within it; export/import move rows between stores exactly."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.placement import LRUPolicy, RecentPolicy
from memory_service.shard.placer import Placer
from memory_service.rows import init_rows
from memory_service.storage.store import TableStore, state_width_of
from memory_service.storage.tiers import DiskEnvironment, RowRecords, DramTier
from memory_service.storage.tiers.device import DeviceTier

NUM_ROWS, WIDTH, CAPACITY = 3000, 8, 40
HOT = 60  # ids below this take 70% of reads and pushes


def config(kind: str) -> TableConfig:
    return TableConfig("t", NUM_ROWS, WIDTH, init_scale=0.1, seed=3,
                       optimizer=OptimizerConfig(kind, lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6))


def tiered_store(cfg: TableConfig, path, capacity: int = CAPACITY) -> TableStore:
    state = state_width_of(cfg)
    disk = DiskEnvironment(str(path), map_bytes=1 << 20).open_table(cfg.name, {}, cfg.width, state)
    return TableStore(cfg, arena=DramTier(cfg.width, state, capacity), disk=disk, policy=LRUPolicy(capacity))


def zipfish(rng, n: int) -> np.ndarray:
    """n ids, 70% from a small hot set: reads hit DRAM, LRU keeps evicting and admitting."""
    return np.where(rng.random(n) < 0.7, rng.integers(0, HOT, n), rng.integers(0, NUM_ROWS, n))


def drive(stores: list[TableStore], lock: threading.Lock, steps: int, placer: Placer | None = None,
          seed: int = 0) -> None:
    """Random fetches (repeats in a request) and pushes (an lr schedule) applied to every store;
    every read must be bit-identical across the stores."""
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        for _ in range(2):
            ids = zipfish(rng, 60)
            with lock:
                reads = [s.read(ids) for s in stores]
            for other in reads[1:]:
                np.testing.assert_array_equal(other, reads[0])
        ids = np.unique(zipfish(rng, 50))
        grads = rng.standard_normal((len(ids), WIDTH)).astype(np.float32)
        lr = 0.05 * 0.98**step
        with lock:
            for s in stores:
                s.check_push(ids, step, lr)
                s.update(ids, grads, step, lr)
                assert s.arena.max_rows is None or len(s.arena) <= s.arena.max_rows
        if placer is not None and step % 4 == 0:
            assert placer.wait_passes(1), placer.error  # placement ran between these requests


def assert_same(a: TableStore, b: TableStore) -> None:
    assert a.digest() == b.digest()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


@pytest.mark.parametrize("kind", ["adam", "sparse_adam"])
def test_tiny_budget_over_lmdb_is_bit_identical_to_all_dram(kind, tmp_path):
    cfg = config(kind)
    store, reference = tiered_store(cfg, tmp_path / "lmdb"), TableStore(cfg)
    lock = threading.Lock()
    placer = Placer(lock, lambda: [store], interval_s=0.001, max_moves=16)
    placer.start()
    try:
        drive([store, reference], lock, steps=60, placer=placer)
    finally:
        placer.stop()
    assert placer.error is None
    assert_same(store, reference)
    arena, disk = store.arena_counters, store.disk_counters
    print(f"\n{kind}: arena {arena}, disk {disk}, {store.arena.num_dirty} dirty of {len(store.arena)} resident")
    assert arena.promotions > 0 and arena.demotions > 0  # placement moved rows both ways
    assert arena.writebacks > 0  # evicted rows that pushes had made dirty went back to LMDB
    assert arena.hits > 0 and disk.hits > 0 and disk.misses > 0  # reads from DRAM, LMDB, the seed
    assert len(store.disk) == reference.num_materialized and len(store.arena) <= CAPACITY
    store.flush()  # dirty rows written back: LMDB alone now holds the table exactly
    assert store.arena.num_dirty == 0
    assert_same(store, reference)


def test_a_push_larger_than_the_budget_goes_to_lmdb(tmp_path):
    cfg = config("sparse_adam")
    store, reference = tiered_store(cfg, tmp_path / "lmdb", capacity=10), TableStore(cfg)
    ids = np.arange(0, 2000, 2)
    grads = np.ones((len(ids), WIDTH), np.float32)
    store.update(ids, grads, 1)
    reference.update(ids, grads, 1)
    assert len(store.arena) == 10 and len(store.disk) == 1000  # LMDB holds every row, DRAM what fits
    assert not store.arena.num_dirty  # the DRAM copies equal LMDB's
    store.read(ids[:50])
    store.place()  # placement admits at most the capacity of the rows just read
    assert len(store.arena) == 10
    store.update(ids[:100], grads[:100], 2)
    reference.update(ids[:100], grads[:100], 2)
    assert store.arena.num_dirty == 10 and len(store.arena) == 10
    assert_same(store, reference)


def test_placement_stops_asking_lmdb_for_rows_it_does_not_hold(tmp_path):
    """Rows read but never written, or moved to another shard, are not admission candidates once
    a pass found them absent (each pass would read LMDB for them again); a push copies the rows
    it writes into DRAM while there is room, so being forgotten costs them nothing."""
    cfg = config("sparse_adam")
    state = state_width_of(cfg)
    disk = DiskEnvironment(str(tmp_path / "lmdb"), map_bytes=1 << 20).open_table(cfg.name, {}, cfg.width, state)
    store = TableStore(cfg, arena=DramTier(cfg.width, state, 10), disk=disk, policy=RecentPolicy(10))
    resident = lambda: np.sort(store.arena.ids())  # noqa: E731
    never_written = np.arange(5)
    store.read(never_written)
    store.tell_policy()  # what the placer does before a plan
    assert set(store.policy.plan(resident())[0]) == set(never_written)  # candidates after the read
    assert store.place() == 0 and not len(store.policy.plan(resident())[0])  # absent: forgotten
    grads = np.ones((5, WIDTH), np.float32)
    store.update(never_written, grads, 1)
    assert sorted(store.arena.ids()) == list(never_written) and not store.arena.num_dirty and len(store.disk) == 5
    store.read(never_written)  # DRAM hits
    assert store.place() == 0
    exported = store.export_rows(never_written[:2])
    assert list(exported.ids) == [0, 1] and len(store.disk) == 3
    store.read(never_written[2:])
    store.tell_policy()
    assert not set(store.policy.plan(resident())[0]) & {0, 1}  # they live elsewhere now
    assert store.read(never_written[:2]).shape == (2, WIDTH)  # read here again: candidates again
    store.tell_policy()
    assert set(store.policy.plan(resident())[0]) == {0, 1}


@pytest.mark.parametrize("kind", ["adam", "sparse_adam"])
def test_export_import_move_rows_exactly(kind, tmp_path):
    """Rows leave a tiered store (dirty DRAM copies, LMDB-only rows, never-written ids), pass
    through a hot shard's store (a device arena) and an all-DRAM one, and come back: bit-identical throughout."""
    cfg = config(kind)
    store, reference = tiered_store(cfg, tmp_path / "lmdb"), TableStore(cfg)
    lock = threading.Lock()
    drive([store, reference], lock, steps=20)
    while store.place(max_moves=64):
        pass
    touched = np.unique(np.concatenate([store.arena.ids()[:10], [1001, 2002]]))  # resident: dirty
    grads = np.full((len(touched), WIDTH), 0.5, np.float32)
    for s in (store, reference):
        s.update(touched, grads, 21)
    dirty = store.arena.ids_at(store.arena.dirty_slots())
    assert len(dirty) and len(store.disk) > len(store.arena)
    disk_only = np.setdiff1d(store.disk.ids(), store.arena.ids())[:30]
    never = np.setdiff1d(np.arange(NUM_ROWS), store.disk.ids())[:5]
    ids = np.random.default_rng(7).permutation(np.concatenate([dirty, disk_only, never]))
    expected = reference.state_dict()
    before = store.num_materialized

    records = store.export_rows(ids)
    written = ids[~np.isin(ids, never)]
    np.testing.assert_array_equal(records.ids, written)  # in the order asked, never-written absent
    at = np.searchsorted(expected["ids"], records.ids)
    for field, key in (("rows", "rows"), ("state", "state"), ("last", "last")):
        np.testing.assert_array_equal(getattr(records, field), expected[key][at])
    assert store.num_materialized == before - len(written)
    assert not np.isin(written, store.disk.ids()).any() and not np.isin(written, store.arena.ids()).any()
    np.testing.assert_array_equal(store.read(written), init_rows(cfg.seed, written, WIDTH, cfg.init_scale))

    hot = TableStore(cfg, arena=DeviceTier(WIDTH, state_width_of(cfg), device="cpu"))
    dram = TableStore(cfg)
    hot.import_rows(records)
    dram.import_rows(hot.export_rows(ids))
    assert hot.num_materialized == 0
    back = dram.export_rows(ids)
    for field in ("ids", "rows", "state", "last"):
        np.testing.assert_array_equal(getattr(back, field), getattr(records, field))
    store.import_rows(back)
    assert store.num_materialized == before and len(store.arena) <= CAPACITY
    assert_same(store, reference)


def test_a_broken_plan_is_refused(tmp_path):
    """place() checks the policy's plan: evicting a row that is not resident would lose it."""
    cfg = config("sgd")
    store = tiered_store(cfg, tmp_path / "lmdb")

    class EvictsStrangers(LRUPolicy):
        def plan(self, resident, max_moves=None):
            return np.empty(0, np.int64), np.array([12345])

    store.policy = EvictsStrangers(CAPACITY)
    with pytest.raises(ValueError, match="EvictsStrangers.plan evicts ids that are not resident"):
        store.place()


def test_records_concat_and_take():
    r = RowRecords(np.array([3, 1]), np.ones((2, 2), np.float32), np.zeros((2, 1), np.float32), np.array([5, 6]))
    both = RowRecords.concat([r, r.take(np.array([1]))])
    assert both.ids.tolist() == [3, 1, 1] and both.last.tolist() == [5, 6, 6] and len(both) == 3
