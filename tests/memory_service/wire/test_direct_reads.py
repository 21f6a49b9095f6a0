"""Same-host direct reads (memory_service/wire/direct_reads.py over storage/tiers/shared_arena.py):
the rows equal a Fetch's, whatever the table, and no read ever sees part of a step while pushes
run beside it. Real shards serving gRPC on 127.0.0.1, their arenas in /dev/shm."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.native import compiled
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.wire.direct_reads import DirectReads

NUM_SHARDS = 2


@pytest.fixture(scope="module")
def cluster():
    shards = [Shard(k, NUM_SHARDS) for k in range(NUM_SHARDS)]
    servers = [serve(shard) for shard in shards]
    yield shards, [f"127.0.0.1:{server.port}" for server in servers]
    for server in servers:
        server.stop(None)
    for shard in shards:
        shard.close()
    assert not any(os.path.exists(shard.shared.path) for shard in shards), "a closed shard left its arena"


def test_the_reader_is_built():
    assert compiled.AVAILABLE, "memory_service.native is not built: pip install -e . builds it"


@pytest.mark.parametrize("kind,dtype", [("sgd", "float32"), ("adam", "float32"), ("sparse_adam", "bfloat16")])
def test_direct_reads_equal_fetches(cluster, kind, dtype):
    shards, targets = cluster
    cfg = TableConfig(name=f"eq-{kind}-{dtype}", num_rows=50_000, width=16, dtype=dtype,
                      optimizer=OptimizerConfig(kind=kind, lr=0.1))
    rng = np.random.default_rng(0)
    ids = rng.choice(cfg.num_rows, 3000, replace=False)
    with MemoryClient(targets) as direct, MemoryClient(targets, direct_reads=False) as fetch:
        direct.create_table(cfg)
        rows_before = [s.counters.fetch_rows for s in shards]
        requests_before = sum(s.counters.fetch_requests for s in shards)
        for step in (1, 2, 3):  # each step a part of the rows: dense Adam's others fall behind
            part = ids[1000 * (step - 1): 1000 * step]
            direct.push({cfg.name: (part, rng.standard_normal((len(part), 16)).astype(np.float32))}, step=step)
            query = np.concatenate([ids, ids[:9]]).reshape(3, -1)  # repeats and a shape kept
            got, want = direct.fetch({cfg.name: query}, min_step=step), fetch.fetch({cfg.name: query})
            assert got[cfg.name].shape == (*query.shape, 16)
            assert np.array_equal(got[cfg.name].numpy(), want[cfg.name].numpy())
        direct.fetch({cfg.name: ids[2000:]})  # pushed at the last step: current for every optimizer
        assert direct.direct.reads >= NUM_SHARDS
        direct.stats()  # reports what was read directly first
        assert sum(s.counters.fetch_requests for s in shards) - requests_before == (3 + 4) * NUM_SHARDS  # one per shard a fetch
        if kind == "adam":
            assert direct.direct.fallbacks >= NUM_SHARDS  # rows behind the committed step go to Fetch
    # every distinct row read, directly or not, is counted by its shard (reports arrive at close)
    read = sum(s.counters.fetch_rows for s in shards) - sum(rows_before)
    assert read == 2 * 3 * len(ids) + 1000


def test_never_written_rows_are_computed_as_the_shard_computes_them(cluster):
    _, targets = cluster
    cfg = TableConfig(name="fresh", num_rows=1000, width=8, seed=7, init_scale=0.3)
    with MemoryClient(targets) as direct, MemoryClient(targets, direct_reads=False) as fetch:
        direct.create_table(cfg)
        ids = np.arange(40)
        direct.push({"fresh": (ids[:10], np.ones((10, 8), np.float32))}, step=1)  # some written
        got, want = direct.fetch({"fresh": ids})["fresh"], fetch.fetch({"fresh": ids})["fresh"]
        assert np.array_equal(got.numpy(), want.numpy())
        assert direct.direct.reads == NUM_SHARDS and direct.direct.fallbacks == 0


def whole_steps(rows: np.ndarray, base: np.ndarray) -> set[int]:
    """The steps rows (n, w) show, each row being base + its step (sgd, lr 1, gradient -1)."""
    steps = np.rint(rows - base)
    assert np.allclose(rows - base, steps, atol=1e-3)
    return set(np.unique(steps).astype(int).tolist())


def test_no_read_sees_part_of_a_step(cluster):
    """Steps pushed one request per shard, each request both tables' every row of the shard,
    while a direct reader, a Fetch reader and a held (min_step) Fetch reader read both tables:
    every read of a shard shows one step for all its rows, never older than its min_step."""
    shards, targets = cluster
    names = ("steps-a", "steps-b")
    num_rows, width, num_steps = 4096, 32, 40
    ids = np.arange(num_rows)
    with MemoryClient(targets) as writer:
        for name in names:
            writer.create_table(TableConfig(name=name, num_rows=num_rows, width=width,
                                            optimizer=OptimizerConfig(kind="sgd", lr=1.0)))
        base = writer.fetch({name: ids for name in names})  # initial rows (never written)
        base = {name: rows.numpy() for name, rows in base.items()}
        grads = -np.ones((num_rows, width), np.float32)
        writer.push({name: (ids, grads) for name in names}, step=1)
        seen: dict[str, list[int]] = {"direct": [], "fetch": [], "held": []}
        done = threading.Event()
        errors: list[BaseException] = []

        def check(kind: str, rows: dict[str, np.ndarray], min_step: int) -> None:
            for shard in range(NUM_SHARDS):
                mine = ids % NUM_SHARDS == shard
                steps = set().union(*(whole_steps(rows[n][mine], base[n][mine]) for n in names))
                assert len(steps) == 1, f"{kind}: shard {shard} showed steps {sorted(steps)} at once"
                assert min(steps) >= min_step
                seen[kind].append(steps.pop())

        def reader(kind: str) -> None:
            try:
                with MemoryClient(targets, direct_reads=kind == "direct") as client:
                    while not done.is_set():
                        min_step = seen[kind][-1] + 1 if kind == "held" and seen[kind] else 0
                        if kind == "held" and min_step > num_steps:
                            break
                        got = client.fetch({n: ids for n in names}, min_step=min_step)
                        check(kind, {n: t.numpy() for n, t in got.items()}, min_step)
                    if kind == "direct":
                        assert client.direct.reads > 0
            except BaseException as err:  # noqa: BLE001 - reported by the test thread
                errors.append(err)

        threads = [threading.Thread(target=reader, args=(kind,)) for kind in seen]
        for t in threads:
            t.start()
        for step in range(2, num_steps + 1):
            writer.push({name: (ids, grads) for name in names}, step=step)
        done.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        assert all(seen.values()) and max(seen["fetch"]) <= num_steps


def test_direct_reads_of_the_raw_reader_never_see_part_of_a_step(cluster):
    """The arena reader itself, between the two halves of a step pushed as two requests per
    shard (commit_later, then CommitStep): whatever it returns is a whole step."""
    shards, targets = cluster
    names = ("raw-a", "raw-b")
    num_rows, width = 1024, 8
    ids = np.arange(num_rows)
    with MemoryClient(targets) as writer:
        for name in names:
            writer.create_table(TableConfig(name=name, num_rows=num_rows, width=width,
                                            optimizer=OptimizerConfig(kind="sgd", lr=1.0)))
        base = {n: r.numpy() for n, r in writer.fetch({n: ids for n in names}).items()}
        grads = -np.ones((num_rows, width), np.float32)
        writer.push({n: (ids, grads) for n in names}, step=1)
        reader = DirectReads(writer.transport)
        shard_ids = ids[ids % NUM_SHARDS == 0]
        stop, results, errors = threading.Event(), [], []

        def read_loop():
            try:
                while not stop.is_set():
                    outs = {n: np.empty((len(shard_ids), width), np.float32) for n in names}
                    if reader.read(0, [(writer.table(n), shard_ids, outs[n]) for n in names], 0):
                        results.append(set().union(*(whole_steps(outs[n], base[n][shard_ids]) for n in names)))
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        thread = threading.Thread(target=read_loop)
        thread.start()
        for step in range(2, 30):
            for name in names:  # two requests per shard, the step open in between (as when rows
                # moved under a push and part of it is re-sent), then the step's commit
                route = writer._route(name, ids)
                writer._push_round({name: route}, {name: grads[route.index]}, step, None, 1).gather()
            writer._commit(list(names), step, None, 1)
        stop.set()
        thread.join(30)
        reader.close()
    assert not errors, errors[0]
    assert results and all(len(steps) == 1 for steps in results), [s for s in results if len(s) > 1][:3]
