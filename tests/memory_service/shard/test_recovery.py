"""Crash recovery: a cold shard killed mid-work comes back from its LMDB files and write-ahead log
with every change it acknowledged, none twice; re-sent requests are applied once."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.errors import InvalidArgument, RowsMoved, StepExpired
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.durability.wal import WalCorrupt, WriteAheadLog

ROOT = Path(__file__).resolve().parents[3]
ROWS, WIDTH = 4000, 8
TABLES = {"sa": "sparse_adam", "ad": "adam", "dp": "sparse_adam"}  # dp: two data-parallel parts per step


def storage(path, **kw) -> StorageConfig:
    """A cold shard whose DRAM holds a few dozen rows: most of every table lives in LMDB."""
    kw = {"dram_budget_bytes": 24 << 10, "placement_interval_s": 0.01, "flush_interval_s": 3600.0,
          "flush_wal_bytes": 1 << 40, **kw}
    return StorageConfig(path=str(path), **kw)


def open_shard(path=None, **kw) -> Shard:
    shard = Shard(0, 1, storage(path, **kw) if path is not None else None)
    for name, kind in TABLES.items():
        shard.create_table(TableConfig(name, ROWS, WIDTH, init_scale=0.1, seed=7,
                                       optimizer=OptimizerConfig(kind, lr=0.05)))
    return shard


def ops(steps: int):
    """The workload, one callable per operation: per step a fetch (dense Adam catches rows up as it
    reads), a two-table push with a request id, and two workers' parts of a data-parallel step;
    every third step rows leave for a hot shard and come back (the return re-sends the export:
    the shard answers with the rows it handed over)."""
    out = []
    for s in range(1, steps + 1):
        rng = np.random.default_rng(s)
        read = rng.choice(ROWS, 300, replace=False)
        ids = {name: rng.choice(ROWS, 400, replace=False) for name in TABLES}
        grads = {name: rng.standard_normal((400, WIDTH)).astype(np.float32) for name in TABLES}
        push = {name: TablePush(s, ids[name], grads[name]) for name in ("sa", "ad")}
        out.append(lambda shard, read=read, s=s: shard.fetch({"ad": read, "sa": read}, min_step=s - 1))
        out.append(lambda shard, push=push, s=s: shard.push("trainer", push, request_seq=s))
        if s % 3 == 0:
            moved = ids["sa"][:50]
            out.append(lambda shard, moved=moved, s=s: shard.export_rows("sa", moved, s, "migrator", s))
            out.append(lambda shard, moved=moved, s=s: shard.import_rows(
                "sa", shard.export_rows("sa", moved, s, "migrator", s), s, moved))
        for w in range(2):
            half = slice(200 * w, 200 * (w + 1))
            part = {"dp": TablePush(s, ids["dp"][half], grads["dp"][half])}
            out.append(lambda shard, part=part, w=w, s=s: shard.push(f"worker{w}", part, contributors=2,
                                                                     request_seq=s))
    return out


def run_ops(shard: Shard, steps: int, start: int = 0, stop: int | None = None, flush_at: int = -1):
    """Runs operations [start, stop) of `ops(steps)`, yielding each one's index once it returned."""
    for k, op in enumerate(ops(steps)[start:stop], start):
        op(shard)
        if k == flush_at:
            shard.flush()  # a checkpoint: records before it are never replayed
        yield k


def states(shard: Shard) -> dict:
    return {name: shard.table_state(name) for name in TABLES}


def assert_same(got: dict, want: dict) -> None:
    for name in TABLES:
        for field in want[name]:
            a, b = got[name][field], want[name][field]
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (name, field)  # lrs[0] is nan


def reference(steps: int, stop: int) -> Shard:
    """An all-DRAM shard that ran operations [0, stop) without a crash."""
    shard = open_shard()
    for _ in run_ops(shard, steps, stop=stop):
        pass
    return shard


CHILD = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from test_recovery import open_shard, run_ops
shard = open_shard({path!r})
for k in run_ops(shard, {steps}, flush_at={flush_at}):
    print(k, flush=True)
import time
time.sleep(600)  # killed before
"""


def test_a_killed_shard_replays_its_log_and_applies_a_resent_request_once(tmp_path):
    """A process applies the workload to a cold shard and is killed (SIGKILL) mid-run, its last
    log record torn as a crash mid-append leaves it. Reopened, the shard equals, array for array,
    an uninterrupted all-DRAM shard that ran every operation the process finished (plus possibly
    the one in flight, whole or not at all); re-running the in-flight one (the same request id)
    gives exactly the state after it, and re-sending an applied request changes nothing."""
    steps, path = 60, tmp_path / "shard"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(
        tests=str(ROOT / "tests" / "memory_service" / "shard"), root=str(ROOT), path=str(path), steps=steps, flush_at=13)],
        stdout=subprocess.PIPE, text=True)
    done = []
    for line in child.stdout:
        done.append(int(line))
        if len(done) == 30:  # after the checkpoint at op 13, long before the workload's end (280 ops)
            os.kill(child.pid, signal.SIGKILL)
            break
    done += [int(line) for line in child.stdout]  # what it finished before the signal landed
    child.wait()
    assert child.returncode == -signal.SIGKILL and len(done) >= 30
    wal_files = WriteAheadLog(str(path / "wal")).files()
    with open(wal_files[-1][1], "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02\x03\x04torn")  # a frame cut short by the crash

    shard = open_shard(path)
    try:
        assert shard.journal.replayed > 0
        n = len(done)
        before, after = reference(steps, n), reference(steps, n + 1)
        recovered = states(shard)
        try:
            assert_same(recovered, states(before))
        except AssertionError:
            assert_same(recovered, states(after))  # the op in flight landed whole
        next(run_ops(shard, steps, start=n, stop=n + 1))  # the client re-sends the op in flight
        assert_same(states(shard), states(after))
        assert shard.digest() == after.digest()
        digest = shard.digest()
        assert shard.push("trainer", {"sa": TablePush(2, np.arange(5), np.ones((5, WIDTH), np.float32))},
                          request_seq=2) == 800  # request 2 was applied before the crash: its answer
        assert shard.digest() == digest
    finally:
        shard.close()
    reopened = open_shard(path)  # closed cleanly: nothing to replay, the same state
    try:
        assert reopened.journal.replayed == 0
        assert reopened.digest() == digest
    finally:
        reopened.close()


@pytest.mark.parametrize("path", [None, "disk"], ids=["dram", "disk"])
def test_a_resent_push_or_commit_is_applied_once(tmp_path, path):
    shard = Shard(0, 1, storage(tmp_path / path) if path else None)
    try:
        shard.create_table(TableConfig("t", 100, 4, optimizer=OptimizerConfig("sparse_adam")))
        push = {"t": TablePush(1, np.arange(10), np.ones((10, 4), np.float32))}
        assert shard.push("c", push, commit=False, request_seq=1) == 10
        digest = shard.digest()
        assert shard.push("c", push, commit=False, request_seq=1) == 10
        assert shard.digest() == digest
        assert shard.push("other", push, commit=False, request_seq=1) == 10  # another client's request 1
        assert shard.digest() != digest
        assert shard.commit("c", {"t": (1, None)}, request_seq=2) == 0
        assert shard.commit("c", {"t": (1, None)}, request_seq=2) == 0
        assert shard.describe_table("t").step == 1
    finally:
        shard.close()


HELD = """
import os, sys
sys.path[:0] = [{tests!r}, {root!r}]
from test_recovery import hold_half_a_step, open_shard
hold_half_a_step(open_shard({path!r}))
print("held", flush=True)
import time
time.sleep(600)  # killed before
"""


def kill_once_it_says(script: str, path, line: str) -> None:
    """Run `script` (a template of tests, root and path) on the shard at `path` in a child
    process and SIGKILL it as soon as it prints `line`: a crash at a known point."""
    child = subprocess.Popen([sys.executable, "-c", script.format(tests=str(ROOT / "tests" / "memory_service" / "shard"),
                                                                  root=str(ROOT), path=str(path))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == f"{line}\n"
    child.kill()
    child.wait()


def hold_half_a_step(shard: Shard) -> None:
    """Two workers' parts of step 1 of "dp" without commit, and worker 0's commit: the step waits
    for worker 1's commit."""
    for w in range(2):
        ids = np.arange(w, 200, 2)  # (100,) ids, disjoint between the workers, each id once
        grads = np.random.default_rng(w).standard_normal((len(ids), WIDTH)).astype(np.float32)
        assert shard.push(f"worker{w}", {"dp": TablePush(1, ids, grads)}, contributors=2, commit=False) == 0
    assert shard.commit("worker0", {"dp": (1, None)}, contributors=2) == 0


@pytest.mark.parametrize("restart", ["close", "kill"])
def test_held_parts_and_commits_come_back_after_a_restart(tmp_path, restart):
    """Parts held and commits counted come back with a reopened cold shard, from the checkpoint a
    close writes (Recovery.snapshot) or from the log a killed process leaves (part and vote
    records): worker 0's second commit is refused and worker 1's applies the sum of both parts,
    exactly as on a shard that never restarted."""
    path = tmp_path / "shard"
    if restart == "close":
        shard = open_shard(path)
        hold_half_a_step(shard)
        shard.close()
    else:
        kill_once_it_says(HELD, path, "held")
    reference = open_shard()
    hold_half_a_step(reference)
    shard = open_shard(path)
    try:
        assert shard.journal.replayed == (0 if restart == "close" else 3)
        with pytest.raises(InvalidArgument, match="client 'worker0' already committed"):
            shard.commit("worker0", {"dp": (1, None)}, contributors=2)
        assert shard.commit("worker1", {"dp": (1, None)}, contributors=2) == 200
        assert reference.commit("worker1", {"dp": (1, None)}, contributors=2) == 200
        assert_same(states(shard), states(reference))
    finally:
        shard.close()


EXPIRED = """
import os, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from test_recovery import expire_half_a_step
expire_half_a_step({path!r})
print("expired", flush=True)
time.sleep(600)  # killed before
"""


MOVED = np.arange(0, 60, 3)  # rows exported for a move their destination then refused
MOVED_SCRIPT = """
import os, sys
sys.path[:0] = [{tests!r}, {root!r}]
from test_recovery import export_moved, open_shard
export_moved(open_shard({path!r}), give_back=GIVE_BACK)
print("moved", flush=True)
import time
time.sleep(600)  # killed before
"""


def expire_half_a_step(path) -> Shard:
    """hold_half_a_step on a shard whose parts expire after 2 s (time for the step's requests on a
    busy machine), then a fetch 2.1 s later, which drops the step; returns the shard, open."""
    shard = open_shard(path, parts_expiry_s=2.0)
    hold_half_a_step(shard)
    time.sleep(2.1)
    shard.fetch({"sa": np.array([0])})
    assert shard.caller_state()["open_steps"] == 0
    return shard


@pytest.mark.parametrize("restart", ["close", "kill"])
def test_an_expired_step_stays_expired_after_a_restart(tmp_path, restart):
    """A step dropped for expiry (issue 22, finding 6) is logged (a parts_expired record) and kept
    by a checkpoint, so the reopened shard holds none of its parts and still refuses its late
    commit, with a long parts_expiry_s this time: the state a shard that never restarted has."""
    path = tmp_path / "shard"
    if restart == "close":
        expire_half_a_step(path).close()
    else:
        kill_once_it_says(EXPIRED, path, "expired")
    shard = open_shard(path)
    try:
        assert shard.journal.replayed == (0 if restart == "close" else 4)
        assert shard.caller_state()["parts_bytes"] == 0 and shard.caller_state()["open_steps"] == 0
        with pytest.raises(StepExpired, match="table 'dp' step 1: its data-parallel parts expired"):
            shard.commit("worker1", {"dp": (1, None)}, contributors=2)
        assert shard.describe_table("dp").step == 0
    finally:
        shard.close()


def push_moved(shard: Shard) -> None:
    grads = np.random.default_rng(3).standard_normal((len(MOVED), WIDTH)).astype(np.float32)
    shard.push("w", {name: TablePush(1, MOVED, grads) for name in TABLES})


def export_moved(shard: Shard, give_back: bool) -> None:
    """Rows MOVED of every table written, exported for a move and, with `give_back`, taken back
    (the destination refused them)."""
    push_moved(shard)
    for seq, name in enumerate(TABLES, 1):
        shard.export_rows(name, MOVED, 1, "migrator", seq)
        if give_back:
            assert shard.return_rows(name, MOVED, 1, "migrator", seq) == len(MOVED)


@pytest.mark.parametrize("give_back", [False, True], ids=["killed-after-export", "killed-after-return"])
def test_rows_given_back_after_a_refused_move_survive_a_crash(tmp_path, give_back):
    """A cold shard killed after an export (before the migrator could give the rows back) still
    remembers the export's rows and takes them back when the return comes; killed after the
    return, it serves them again: either way the rows come back exact (the return is logged like
    an import), and a re-sent return changes nothing."""
    path = tmp_path / "shard"
    kill_once_it_says(MOVED_SCRIPT.replace("GIVE_BACK", str(give_back)), path, "moved")
    reference = open_shard()
    push_moved(reference)
    shard = open_shard(path)
    try:
        for seq, name in enumerate(TABLES, 1):
            if not give_back:
                with pytest.raises(RowsMoved):
                    shard.fetch({name: MOVED})
                assert shard.return_rows(name, MOVED, 1, "migrator", seq) == len(MOVED)
            assert shard.return_rows(name, MOVED, 1, "migrator", seq) == 0  # re-sent: nothing to do
            np.testing.assert_array_equal(shard.fetch({name: MOVED})[name], reference.fetch({name: MOVED})[name])
        assert_same(states(shard), states(reference))
    finally:
        shard.close()


ZERO_LRS = (0.05, 0.0, 0.0)  # a schedule that ends at 0 (cosine to eta_min = 0): zero steps


def push_zero_steps(shard: Shard) -> None:
    """Steps 1..3 of "sa" and "ad" at ZERO_LRS: the last two move optimizer state, never rows."""
    for step, lr in enumerate(ZERO_LRS, start=1):
        ids = np.arange(step, 300, 3)
        grads = np.random.default_rng(step).standard_normal((len(ids), WIDTH)).astype(np.float32)
        shard.push("trainer", {name: TablePush(step, ids, grads, lr=lr) for name in ("sa", "ad")}, request_seq=step)


ZERO_CHILD = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]
from test_recovery import open_shard, push_zero_steps
push_zero_steps(open_shard({path!r}))
print("pushed", flush=True)
import time
time.sleep(600)  # killed before
"""


def test_a_replayed_push_at_lr_zero_is_still_a_zero_step(tmp_path):
    """The write-ahead log keeps each step's lr as the step log has it, so a replayed lr 0 stays a
    zero step (it does not turn into the configured lr): a killed cold shard comes back equal to
    one that never stopped, and its steps 2 and 3 keep lr 0."""
    path = tmp_path / "shard"
    kill_once_it_says(ZERO_CHILD, path, "pushed")
    want = open_shard()
    push_zero_steps(want)
    shard = open_shard(path)
    try:
        assert shard.journal.replayed > 0
        got = states(shard)
        assert_same(got, states(want))
        assert list(got["sa"]["lrs"]) == list(ZERO_LRS)
        assert list(got["sa"]["steps"]) == list(range(1, len(ZERO_LRS) + 1))
        with pytest.raises(InvalidArgument, match="not 0.05"):  # no lr: the configured one, not step 3's
            shard.commit("trainer", {"sa": (3, None)})
    finally:
        shard.close()


def test_a_damaged_log_is_refused_but_a_torn_last_record_is_not(tmp_path):
    wal = WriteAheadLog(str(tmp_path))
    wal.open(1)
    for i in range(3):
        wal.append({"i": i})
    wal.rotate(3)  # records 1..3 are in LMDB: their file goes
    wal.append({"i": 3})
    wal.close()
    assert [r["seq"] for r in WriteAheadLog(str(tmp_path)).read(3)] == [4]
    (_, path), = WriteAheadLog(str(tmp_path)).files()
    with open(path, "ab") as f:
        f.write(b"\x05\x00\x00\x00")  # torn: the last file may end like this after a crash
    assert [r["seq"] for r in WriteAheadLog(str(tmp_path)).read(3)] == [4]
    later = WriteAheadLog(str(tmp_path))
    later.open(5)
    later.append({"i": 4})
    later.close()
    with pytest.raises(WalCorrupt, match="not the last"):
        list(WriteAheadLog(str(tmp_path)).read(3))


# -- shard actors under Ray: kill -9 and SIGTERM ----------------------------------------------------


def cold_cluster(make_cluster, path, **kw):
    """Two cold shards whose DRAM holds a few dozen rows of each table (the rest is in LMDB), that
    flush only when closed: every change since start is in the write-ahead log."""
    return make_cluster(2, storage=storage(path, dram_budget_bytes=16 << 10, placement_interval_s=0.02), **kw)


def rows_of(cluster, names) -> dict:
    """{table: every written row with its optimizer state and last step, whichever shard is its
    home (in id order), and each shard's step log}; migration stops first so rows hold still."""
    import ray

    for actor in cluster.hot_actors:
        ray.get(actor.stop_migration.remote())
    actors = [*cluster.actors, *cluster.hot_actors]
    out = {}
    for name in names:
        states = [ray.get(actor.table_state.remote(name)) for actor in actors]
        ids = np.concatenate([state["ids"] for state in states])
        assert len(np.unique(ids)) == len(ids), f"{name}: a row has two homes"
        order = np.argsort(ids)
        out[name] = {field: np.concatenate([state[field] for state in states])[order]
                     for field in ("ids", "rows", "state", "last")}
        for i, state in enumerate(states):
            out[name][f"step log of shard {i}"] = np.stack([state["steps"], state["lrs"]])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, num_hot", [("sparse_adam", 0), ("adam", 0), ("sparse_adam", 1)],
                         ids=["sparse_adam", "adam", "sparse_adam+hot"])
def test_kill_9_of_a_cold_shard_mid_training_loses_no_update_and_applies_none_twice(
        make_cluster, corpus_dir, tmp_path, optimizer, num_hot):
    """Training through the service (prefetch and look-ahead on) while cold shard 1's process is
    killed with SIGKILL as step 12's push reaches it: Ray restarts it, it replays its write-ahead
    log, the client re-sends what failed, the run finishes by itself, and every table's rows and
    optimizer state equal an uninterrupted run's exactly. Sparse and dense Adam tables; with a hot
    shard whose small capacity keeps rows moving to and from the killed shard (sparse Adam only:
    dense Adam's catch-up batches differ in the last bit when rows sit on other shards)."""
    import ray

    from trainer.data import Corpus
    from trainer.train import ServiceOptions, train
    from tests.trainer.test_train import small_train_config

    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=25, warmup_steps=3,
                  table_optimizer=optimizer, table_lr_mult=5.0, threads=1)
    corpus = Corpus.load(cfg.corpus)
    service = ServiceOptions(prefix="kill", lookahead=True)
    hot = dict(num_hot=num_hot, hot_rows=128, migrate_interval_s=0.01, migrate_max_duty=1.0)

    calm = cold_cluster(make_cluster, tmp_path / "calm", **hot)
    with calm.client() as client:
        want = train(cfg, corpus, client=client, service=service)
        names = sorted(t.name for t in client.report().shards[0].tables)
    want_rows = rows_of(calm, names)

    crashing = cold_cluster(make_cluster, tmp_path / "crash", **hot)
    victim = crashing.actors[1]
    pid = ray.get(victim.pid.remote())
    killed = threading.Event()

    def kill_on_push(event: str, fields: dict) -> None:  # as the push reaches the shard
        if event == "push_sent" and fields["step"] == 12 and fields["shard"] == 1 and not killed.is_set():
            killed.set()
            threading.Timer(0.002, os.kill, (pid, signal.SIGKILL)).start()

    with crashing.client() as client:
        client.trace = kill_on_push
        got = train(cfg, corpus, client=client, service=service)
        report = client.report()
        retries = client.retries
    new_pid, recovered = ray.get(victim.pid.remote()), ray.get(victim.recovery.remote())
    moves = [ray.get(actor.migration_counters.remote()) for actor in crashing.hot_actors]
    print(f"kill -9 of pid {pid} at step 12: restarted as pid {new_pid}, {recovered['wal_replayed']} "
          f"write-ahead log records replayed, {retries} client retries; migration {moves}")
    assert killed.is_set() and new_pid != pid
    assert retries > 0
    assert recovered["wal_replayed"] > 0
    # operators see it: Stats (and so the CLI and Prometheus) reports the replay, on that shard only
    assert [s.wal_replayed for s in report.shards if s.role == "cold"] == [0, recovered["wal_replayed"]]
    assert all(m["promoted"] > 0 and m["demoted"] > 0 for m in moves), moves
    for table in report.shards[1].tables:  # the disk tier was in use: most rows lived in LMDB
        dram, disk = table.tiers
        assert disk.tier == "disk" and disk.rows > 4 * dram.rows, table
    assert got.train_losses == want.train_losses
    assert_same_tables(rows_of(crashing, names), want_rows)


def assert_same_tables(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        for field in want[name]:
            a, b = got[name][field], want[name][field]
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (name, field)


@pytest.mark.slow
def test_sigterm_flushes_and_the_restarted_shard_holds_every_acknowledged_push(make_cluster, tmp_path):
    """A client pushes and reads continuously while cold shard 0 gets SIGTERM: it stops serving,
    flushes and exits; Ray starts it again from its files alone (its log is empty: nothing to
    replay), and every shard holds exactly the pushes the client got acknowledged, as two
    in-process shards given those pushes do."""
    import ray

    cluster = cold_cluster(make_cluster, tmp_path / "cluster")
    victim = cluster.actors[0]
    pid = ray.get(victim.pid.remote())
    cfg = TableConfig("sig", 20000, WIDTH, seed=3, optimizer=OptimizerConfig("sparse_adam", lr=0.05))
    acknowledged: list[tuple[int, np.ndarray, np.ndarray]] = []
    stop = threading.Event()

    def traffic(client) -> None:
        for step in itertools.count(1):
            if stop.is_set():
                return
            rng = np.random.default_rng(step)
            ids = rng.choice(cfg.num_rows, 500, replace=False)
            grads = rng.standard_normal((500, WIDTH)).astype(np.float32)
            client.push({cfg.name: (ids, grads)}, step=step)
            acknowledged.append((step, ids, grads))
            client.fetch({cfg.name: rng.choice(cfg.num_rows, 500)}, min_step=step)

    def wait_until(done, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert not pusher.done(), pusher.result()  # the traffic failed: its error
            assert time.monotonic() < deadline, "the traffic made no progress"
            time.sleep(0.02)

    with cluster.client() as client, ThreadPoolExecutor(1) as pool:
        client.create_table(cfg)
        pusher = pool.submit(traffic, client)
        wait_until(lambda: len(acknowledged) >= 20)
        os.kill(pid, signal.SIGTERM)
        at_signal = len(acknowledged)
        wait_until(lambda: ray.get(victim.pid.remote()) != pid and len(acknowledged) >= 60)
        stop.set()
        pusher.result()
        retries = client.retries
    recovered = ray.get(victim.recovery.remote())
    print(f"SIGTERM after {at_signal} acknowledged pushes: {len(acknowledged)} acknowledged in all, "
          f"{recovered['wal_replayed']} records replayed, {retries} client retries")
    assert retries > 0
    assert recovered["wal_replayed"] == 0
    want = [Shard(i, 2) for i in range(2)]
    for shard in want:
        shard.create_table(cfg)
        for step, ids, grads in acknowledged:
            mine = ids % 2 == shard.shard_id
            shard.push("reference", {cfg.name: TablePush(step, ids[mine], grads[mine])})
    got = rows_of(cluster, [cfg.name])[cfg.name]
    want_rows = [shard.table_state(cfg.name) for shard in want]
    order = np.argsort(np.concatenate([w["ids"] for w in want_rows]))
    for field in ("ids", "rows", "state", "last"):
        assert np.array_equal(got[field], np.concatenate([w[field] for w in want_rows])[order]), field
    for i, w in enumerate(want_rows):
        assert np.array_equal(got[f"step log of shard {i}"], np.stack([w["steps"], w["lrs"]]))
