"""Memory acceptance of a cold shard: a 100M-row table (width 64, sparse Adam) after 2M distinct
rows were pushed, with a 256 MiB DRAM budget, keeps its anonymous RSS at rest within the budget
plus the fixed overhead of the same process with the table empty; the rest is in LMDB on disk
(mapped pages count in RssFile, not RssAnon). Reopening the shard from its files recovers every row (the digest
over all 2M, and ids) and its optimizer state (a 10k sample against an all-DRAM store).

The shard runs in a child process of its own (spawned, with the malloc settings shard actors get)
so RssAnon is the shard's alone."""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from memory_service.cluster import shard_env
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.rows import init_rows
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.storage.store import TableStore

BUDGET = 256 << 20
NUM_PUSHED, BATCH = 2_000_000, 100_000
CFG = TableConfig("big", 100_000_000, 64, init_scale=0.1, seed=11,
                  optimizer=OptimizerConfig("sparse_adam", lr=1e-3))
MiB = 2**20


def pushed_ids() -> np.ndarray:
    """2M distinct ids of the 100M, in the (random) order they are pushed."""
    rng = np.random.default_rng(0)
    return rng.permutation(np.unique(rng.integers(0, CFG.num_rows, NUM_PUSHED + 50_000))[:NUM_PUSHED])


def batches(ids: np.ndarray) -> list[np.ndarray]:
    """Step k + 1 pushes batch k (distinct, sorted ids)."""
    return [np.sort(ids[i:i + BATCH]) for i in range(0, len(ids), BATCH)]


def batch_of(ids: np.ndarray, step: int) -> np.ndarray:
    return np.sort(ids[(step - 1) * BATCH: step * BATCH])


def grads_of(ids: np.ndarray) -> np.ndarray:
    """A deterministic gradient per id (n, 64), so a check can recompute any row's pushes."""
    return ((ids[:, None] % 1009 + np.arange(CFG.width)) % 31 / 31 - 0.5).astype(np.float32)


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def storage(path: str) -> StorageConfig:
    return StorageConfig(path=path, dram_budget_bytes=BUDGET)


def run_cold_shard(path: str, conn) -> None:
    """The child: push every batch, read recent rows so placement fills DRAM, wait until it is at
    rest, measure, close."""
    from memory_service.shard.placer import TRIM_INTERVAL_S, release_free_heap

    start = time.perf_counter()
    ids = pushed_ids()
    shard = Shard(0, 1, storage(path))
    shard.create_table(CFG)
    # One-time allocations count as fixed: a read of never-written rows and an empty push (its
    # step logged in LMDB) leave the table empty but have run the request paths once.
    shard.fetch({CFG.name: ids[:BATCH]})
    shard.push("c", {CFG.name: TablePush(1, ids[:0], np.zeros((0, CFG.width), np.float32))})
    assert shard.describe_table(CFG.name).rows_materialized == 0
    release_free_heap()  # at rest, as the placer leaves a shard every TRIM_INTERVAL_S
    fixed = rss_anon()
    rng = np.random.default_rng(1)
    num_steps = NUM_PUSHED // BATCH
    for step in range(1, num_steps + 1):
        batch = batch_of(ids, step)  # made per step: the harness keeps no copy of the ids
        shard.push("c", {CFG.name: TablePush(step, batch, grads_of(batch))})
        del batch
        if step > num_steps - 4:  # recent rows read: the LRU policy wants ~all of DRAM
            recent = ids[max(0, step * BATCH - 400_000): step * BATCH]
            shard.fetch({CFG.name: rng.choice(recent, 150_000, replace=False)})
    store = shard._tables.store(CFG.name)
    moved = -1
    while moved != store.arena_counters.promotions:  # placement at rest: nothing left to admit
        moved = store.arena_counters.promotions
        shard.placer.wait_passes(2)
    time.sleep(TRIM_INTERVAL_S)
    shard.placer.wait_passes(2)  # the placer has trimmed the heap since
    final = rss_anon()
    pushed_s = time.perf_counter() - start
    (table,) = shard.usage()
    memory, disk = table.tiers
    digest = shard.digest()
    shard.close()
    conn.send(dict(fixed=fixed, final=final, arena_rows=memory.rows, arena_bytes=memory.bytes,
                   state_bytes=table.optimizer_state_bytes, capacity=store.arena.max_rows,
                   disk_rows=disk.rows, disk_bytes=disk.bytes, promotions=memory.promotions,
                   digest=digest, pushed_s=pushed_s))


def reference_of(sample: np.ndarray, ids: np.ndarray) -> TableStore:
    """An all-DRAM store given the same pushes, restricted to the sample's rows (sparse Adam
    updates each row from its own gradients only), and the same step log."""
    reference = TableStore(CFG)
    for step, batch in enumerate(batches(ids), 1):
        mine = batch[np.isin(batch, sample)]
        reference.update(mine, grads_of(mine), step)
    return reference


@pytest.mark.slow
def test_cold_shard_keeps_rss_anon_within_budget_and_reopens(tmp_path, monkeypatch):
    path = str(tmp_path / "shard")
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(key, raising=False)
    for key, value in shard_env(storage(path)).items():  # a cold shard actor's malloc settings
        monkeypatch.setenv(key, value)
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=run_cold_shard, args=(path, send))
    child.start()
    send.close()  # the child holds the only writer: if it dies, recv raises EOFError, not hangs
    try:
        got = receive.recv()
    except EOFError:
        child.join(60)
        pytest.fail(f"the shard process died before reporting (exit code {child.exitcode})")
    child.join(60)
    assert child.exitcode == 0

    fixed, final = got["fixed"], got["final"]
    print(f"\ncold shard, {NUM_PUSHED:,} rows of {CFG.num_rows:,} pushed in {got['pushed_s']:.0f} s: "
          f"RssAnon {final / MiB:.1f} MiB = fixed overhead {fixed / MiB:.1f} MiB (empty table) + "
          f"{(final - fixed) / MiB:.1f} MiB; DRAM budget {BUDGET / MiB:.0f} MiB; memory tier "
          f"{got['arena_rows']:,} rows (capacity {got['capacity']:,}, {(got['arena_bytes'] + got['state_bytes']) / MiB:.1f} MiB); "
          f"LMDB {got['disk_rows']:,} rows, {got['disk_bytes'] / MiB:.0f} MiB on disk")
    assert final <= BUDGET + fixed
    assert got["arena_rows"] >= 0.9 * got["capacity"] and got["promotions"] >= got["arena_rows"]  # DRAM was used
    assert got["disk_rows"] == NUM_PUSHED and got["disk_bytes"] > 2 * BUDGET  # the rest is on disk

    ids = pushed_ids()
    shard = Shard(0, 1, storage(path))
    try:
        info = shard.describe_table(CFG.name)
        assert (info.rows_materialized, info.step) == (NUM_PUSHED, NUM_PUSHED // BATCH)
        rng = np.random.default_rng(2)
        sample = rng.choice(ids, 10_000, replace=False)
        never = np.setdiff1d(rng.integers(0, CFG.num_rows, 200), ids)
        reference = reference_of(sample, ids)
        with shard._lock:  # the shard's placement thread runs beside these reads of its store
            store = shard._tables.store(CFG.name)
            np.testing.assert_array_equal(store.disk.ids(), np.sort(ids))  # every row, and no other
            found, rows, state, last = store.disk.get(sample)
            log = store.optimizer.log_state()
        expected = reference.arena.get(sample)
        assert found.all() and expected[0].all()
        for got_field, want in zip((rows, state, last), expected[1:]):
            np.testing.assert_array_equal(got_field, want)
        assert log["step"] == reference.optimizer.log_state()["step"]
        np.testing.assert_array_equal(log["lrs"], reference.optimizer.log_state()["lrs"])
        assert shard.digest() == got["digest"]  # every row, state and last step bit for bit
        np.testing.assert_array_equal(shard.fetch({CFG.name: sample})[CFG.name], reference.read(sample))
        np.testing.assert_array_equal(shard.fetch({CFG.name: never})[CFG.name],
                                      init_rows(CFG.seed, never, CFG.width, CFG.init_scale))
    finally:
        shard.close()
