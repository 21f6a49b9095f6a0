"""Checkpoints of a tables cluster: save at one step while rows migrate, restore bit-identically
onto the same or another number of shards (DRAM or LMDB), refuse what is incomplete or damaged,
and `engram checkpoint save|restore|inspect` from the command line."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from memory_service.durability import checkpoint
from memory_service.durability.checkpoint import CheckpointOptions, restore_checkpoint, save_checkpoint
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.errors import CheckpointCorrupt, FailedPrecondition
from memory_service.rpc import memory_pb2

pytestmark = pytest.mark.slow

WIDTH, NUM_ROWS, STEPS = 8, 3000, 24
TABLES = [TableConfig(f"ck/{kind}", NUM_ROWS, WIDTH, init_scale=0.1, seed=seed,
                      optimizer=OptimizerConfig(kind, lr=0.01, beta1=0.9, beta2=0.95))
          for seed, kind in enumerate(("sparse_adam", "adam"))]
NAMES = [t.name for t in TABLES]


def train_steps(client, steps: range, seed: int) -> None:
    """Fetch-then-push steps over both tables; reads favour a few hundred rows, so a hot shard
    promotes them (and demotes them as the favourites shift)."""
    rng = np.random.default_rng(seed)
    favourites = [rng.choice(NUM_ROWS, 200, replace=False) for _ in range(3)]
    for step in steps:
        popular = favourites[(step // 8) % 3]
        ids = {name: np.unique(np.r_[rng.choice(popular, 150), rng.integers(0, NUM_ROWS, 60)]) for name in NAMES}
        client.fetch(ids, min_step=step - 1)
        grads = {name: (i, rng.normal(size=(len(i), WIDTH)).astype(np.float32)) for name, i in ids.items()}
        client.push(grads, step=step, lr=0.01 * (1 + step % 4))  # a schedule: every step's lr is logged


def read_until_promoted(client, hot_actor, timeout: float = 30.0) -> None:
    """Reads a few hundred rows again and again until the hot shard's migrator promoted some: after
    the fixture's setup it rests up to IDLE_PAUSE_S between looks (nobody read), and on a fast
    machine every step of train_steps fits inside one rest."""
    deadline = time.monotonic() + timeout
    while ray.get(hot_actor.migration_counters.remote())["promoted"] == 0:
        assert time.monotonic() < deadline, f"no row promoted in {timeout} s of reads"
        client.fetch({name: np.arange(200) for name in NAMES})
        time.sleep(0.02)


def merged_state(cluster, name: str) -> dict[str, np.ndarray]:
    """The table over every shard, cold and hot, per row id: ids sorted, each once; and the step
    log (the same on every shard)."""
    states = ray.get([a.table_state.remote(name) for a in [*cluster.actors, *cluster.hot_actors]])
    ids = np.concatenate([s["ids"] for s in states])
    assert len(np.unique(ids)) == len(ids), "a row is held by two shards"
    order = np.argsort(ids)
    out = {k: np.concatenate([s[k] for s in states])[order] for k in ("ids", "rows", "state", "last")}
    for s in states:
        assert s["lrs"].tobytes() == states[0]["lrs"].tobytes() and s["step"] == states[0]["step"]
        assert s["steps"].tobytes() == states[0]["steps"].tobytes()
    return {**out, "steps": states[0]["steps"], "lrs": states[0]["lrs"], "step": states[0]["step"]}


def assert_same_state(got: dict, want: dict) -> None:
    """Bit for bit: ids, rows, optimizer state, last steps and the step log."""
    for key in want:
        assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes(), key


def table_names(cluster) -> list[list[str]]:
    with cluster.client(shared_memory=False) as client:
        return [list(r.names) for r in checkpoint._call_all(client, "ListTables", memory_pb2.ListTablesRequest(), 30)]


def dense_pair(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def saved(make_cluster, tmp_path_factory):
    """A cluster of 2 cold shards and a hot one trained STEPS steps, its rows migrating, with a
    checkpoint taken while migration runs, and the state it held then (rows stop moving for the
    read: migration stops after the save)."""
    cluster = make_cluster(2, num_hot=1, hot_rows=64, migrate_interval_s=0.005, migrate_max_duty=1.0)
    model, opt = dense_pair(0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
    path = tmp_path_factory.mktemp("saved") / "ck"
    with cluster.client() as client:
        for table in TABLES:
            client.create_table(table)
        train_steps(client, range(1, STEPS + 1), seed=0)
        read_until_promoted(client, cluster.hot_actors[0])  # rows are hot at the save
        manifest = save_checkpoint(path, client, model=model, optimizers=[opt], extra={"epoch": 3, "note": "x"})
        ray.get(cluster.hot_actors[0].stop_migration.remote())
        moves = ray.get(cluster.hot_actors[0].migration_counters.remote())
        state = {name: merged_state(cluster, name) for name in NAMES}
        yield dict(cluster=cluster, client=client, path=path, manifest=manifest, state=state, moves=moves,
                   model=model, opt=opt)


def test_save_writes_every_shard_and_the_hot_rows(saved):
    manifest, state = saved["manifest"], saved["state"]
    assert manifest.step == STEPS and (manifest.num_shards, manifest.num_hot) == (2, 1)
    assert saved["moves"]["promoted"] > 0 and not saved["moves"]["error"], saved["moves"]
    roles = sorted((s.role, s.shard_id) for s in manifest.shards)
    assert roles == [("cold", 0), ("cold", 1), ("hot", 0)]
    hot = next(s for s in manifest.shards if s.role == "hot")
    assert sum(f.rows for f in hot.files) > 0  # rows were hot at the save: their home's file holds them
    for name in NAMES:
        assert manifest.table(name).rows == len(state[name]["ids"]) > 0
        assert manifest.table(name).config == next(t for t in TABLES if t.name == name)
    names = {p.name for p in saved["path"].iterdir()}
    assert names == {"manifest.json", "dense.pt", "shard-0000-of-0002", "shard-0001-of-0002", "hot-0000-of-0001"}
    assert not list(saved["path"].parent.glob("*.partial-*"))


def test_restore_is_bit_identical_rows_optimizer_state_and_dense(saved, make_cluster):
    """Onto 2 fresh shards: every row, its Adam moments and last step, the step logs, the dense
    weights and AdamW state, bit for bit; the tables continue from the saved step."""
    target = make_cluster(2)
    model, opt = dense_pair(1)  # other weights, fresh optimizer
    with target.client() as client:
        restored = restore_checkpoint(saved["path"], client, model=model, optimizers=[opt])
        assert restored.extra == {"epoch": 3, "note": "x"}
        for name in NAMES:
            assert_same_state(merged_state(target, name), saved["state"][name])
        steps = {t.name: t.step for shard in client.stats() for t in shard.tables}
        assert steps == {name: STEPS for name in NAMES}
    for a, b in zip(model.state_dict().values(), saved["model"].state_dict().values()):
        assert torch.equal(a, b)
    got, want = opt.state_dict(), saved["opt"].state_dict()
    assert got["param_groups"] == want["param_groups"]
    for i in want["state"]:
        for key in want["state"][i]:
            assert torch.equal(got["state"][i][key], want["state"][i][key]), (i, key)


def test_restore_onto_three_lmdb_shards_and_a_hot_one_keeps_every_row(saved, make_cluster, tmp_path):
    """2 cold + 1 hot shards saved; 3 cold shards with LMDB and a 32 KiB DRAM budget, and an empty
    hot shard, restored: rows and optimizer state identical per row id, each row at its new home
    (id % 3), most of them in LMDB; both clusters then take the same steps and stay equal."""
    storage = StorageConfig(path=str(tmp_path / "lmdb"), dram_budget_bytes=32 << 10, placement_interval_s=0.01)
    target = make_cluster(3, num_hot=1, hot_rows=64, migrate_interval_s=0.005, migrate_max_duty=1.0, storage=storage)
    with target.client() as client:
        restore_checkpoint(saved["path"], client)
        for name in NAMES:
            assert_same_state(merged_state(target, name), saved["state"][name])
            assert not len(ray.get(target.hot_actors[0].table_state.remote(name))["ids"])  # hot starts empty
            for shard, actor in enumerate(target.actors):
                ids = ray.get(actor.table_state.remote(name))["ids"]
                assert len(ids) and (ids % 3 == shard).all()
        rows = {"disk": 0, "dram": 0}  # rows of the first table per tier, over the cold shards
        for shard in client.report().shards:
            for tier in (t for table in shard.tables if table.name == NAMES[0] for t in table.tiers):
                rows[tier.tier] += tier.rows
        assert rows["disk"] == len(saved["state"][NAMES[0]]["ids"]) > 2 * rows["dram"]

        source = saved["client"]
        train_steps(client, range(STEPS + 1, STEPS + 9), seed=7)
        train_steps(source, range(STEPS + 1, STEPS + 9), seed=7)
        everything = {name: np.arange(NUM_ROWS) for name in NAMES}
        got, want = client.fetch(everything, STEPS + 8), source.fetch(everything, STEPS + 8)
        # and a checkpoint of the LMDB shards (rows newer in DRAM than in LMDB among them) holds
        # what the DRAM source holds after the same steps
        manifest = save_checkpoint(tmp_path / "from-lmdb", client)
    # sparse Adam updates each row alone: exact. Dense Adam's catch-up batches rows per shard, and
    # its result depends on the batch in the last bit (memory_service/storage/store.py).
    np.testing.assert_array_equal(got[NAMES[0]].numpy(), want[NAMES[0]].numpy())
    np.testing.assert_allclose(got[NAMES[1]].numpy(), want[NAMES[1]].numpy(), rtol=1e-6, atol=1e-7)
    files = [np.load(tmp_path / "from-lmdb" / f.path) for shard in manifest.shards for f in shard.files
             if f.kind == "rows" and f.table == NAMES[0]]
    records = np.concatenate(files)[np.argsort(np.concatenate(files)["id"])]
    ray.get(saved["cluster"].hot_actors[0].stop_migration.remote())
    want = merged_state(saved["cluster"], NAMES[0])
    for field, key in (("id", "ids"), ("row", "rows"), ("state", "state"), ("last", "last")):
        assert np.ascontiguousarray(records[field]).tobytes() == want[key].tobytes(), field


def test_saves_while_rows_migrate_every_millisecond_hold_every_row_once(make_cluster, tmp_path):
    """Reads shift every few requests and the hot shard moves rows every millisecond while 20
    checkpoints are taken: each holds every written row exactly once. (With the MoveGate's pause
    disabled, 5 of 30 such saves here lost rows that were between a cold and the hot shard.)"""
    import threading

    cluster = make_cluster(2, num_hot=1, hot_rows=32, migrate_interval_s=0.001, migrate_max_duty=1.0)
    written = np.arange(0, 2000, 2)
    with cluster.client() as client:
        client.create_table(TableConfig("moving", 2000, 4))
        client.push({"moving": (written, np.ones((len(written), 4), np.float32))}, step=1)
        stop = threading.Event()

        def read_shifting_rows() -> None:
            for k in range(10**9):
                if stop.is_set():
                    return
                client.fetch({"moving": written[(k // 5) % 10 * 100:][:100]}, min_step=1)

        reader = threading.Thread(target=read_shifting_rows)
        reader.start()
        try:
            hot_rows = []
            for i in range(20):
                manifest = save_checkpoint(tmp_path / f"c{i}", client)
                ids = np.concatenate([np.load(tmp_path / f"c{i}" / f.path)["id"]
                                      for shard in manifest.shards for f in shard.files if f.kind == "rows"])
                assert np.array_equal(np.sort(ids), written), f"save {i}: {len(ids)} rows, {len(np.unique(ids))} distinct"
                hot_rows.append(sum(f.rows for s in manifest.shards if s.role == "hot" for f in s.files))
        finally:
            stop.set()
            reader.join()
    moves = ray.get(cluster.hot_actors[0].migration_counters.remote())
    assert moves["promoted"] > 100 and moves["demoted"] > 100 and not moves["error"], moves
    assert max(hot_rows) > 0


def test_a_checkpoint_needs_every_table_at_its_step(saved, tmp_path):
    client = saved["client"]
    step = saved["manifest"].step
    with pytest.raises(FailedPrecondition, match=f"not at the checkpoint's step {step + 100}"):
        save_checkpoint(tmp_path / "ahead", client, step + 100, options=CheckpointOptions(wait_s=0.2))
    assert not list(tmp_path.iterdir())  # nothing left behind, not even the temporary directory
    with pytest.raises(FileExistsError):
        save_checkpoint(saved["path"], client)


def test_restore_refuses_a_cluster_that_holds_the_tables(saved):
    before = ray.get([a.digest.remote() for a in saved["cluster"].actors])
    with pytest.raises(FailedPrecondition, match="holds table"):
        restore_checkpoint(saved["path"], saved["client"])
    assert ray.get([a.digest.remote() for a in saved["cluster"].actors]) == before


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _rows_file(root: Path) -> Path:
    return next((root / "shard-0001-of-0002").glob("*.rows.npy"))


DAMAGE = {
    "no manifest": (lambda root: (root / "manifest.json").unlink(), "has no manifest.json"),
    "a changed byte in a rows file": (lambda root: _flip_byte(_rows_file(root)), "is damaged: sha256"),
    "a truncated rows file": (lambda root: _rows_file(root).write_bytes(_rows_file(root).read_bytes()[:-100]),
                              "truncated or replaced"),
    "a missing hot shard file": (lambda root: next((root / "hot-0000-of-0001").glob("*.rows.npy")).unlink(),
                                 "is missing"),
    "a changed byte in the dense file": (lambda root: _flip_byte(root / "dense.pt"), "is damaged: sha256"),
    "an edited manifest": (lambda root: (root / "manifest.json").write_text(
        (root / "manifest.json").read_text().replace(f'"step": {STEPS}', f'"step": {STEPS + 1}', 1)),
        "does not match its content"),
}


def test_damaged_checkpoints_are_refused_and_change_nothing(saved, make_cluster, tmp_path, capsys):
    """Each damage is refused by restore and by inspect (`engram checkpoint inspect` exits 1),
    naming what is wrong; the target cluster still holds nothing; the undamaged copy then
    restores onto it."""
    from trainer.cli import main

    target = make_cluster(1)
    with target.client() as client:
        for what, (damage, message) in DAMAGE.items():
            root = tmp_path / what.replace(" ", "_")
            shutil.copytree(saved["path"], root)
            damage(root)
            with pytest.raises(CheckpointCorrupt, match=message):
                restore_checkpoint(root, client)
            assert table_names(target) == [[]], what
            assert main(["checkpoint", "inspect", str(root)]) == 1
            assert message.split(":")[0] in capsys.readouterr().err, what
        restore_checkpoint(saved["path"], client)
        for name in NAMES:
            assert_same_state(merged_state(target, name), saved["state"][name])


def test_an_unfinished_save_is_never_taken_for_a_checkpoint(saved, tmp_path):
    """What a save that crashed before its manifest leaves, a '<name>.partial-*' directory with
    the shards' files, is refused under either name, and latest_checkpoint skips it."""
    runs = tmp_path / "run"
    shutil.copytree(saved["path"], runs / "step-00000010")
    partial = runs / "step-00000020.partial-1f2e3d4c"
    shutil.copytree(saved["path"], partial, ignore=shutil.ignore_patterns("manifest.json"))
    with pytest.raises(CheckpointCorrupt, match="unfinished saves beside it: step-00000020.partial-1f2e3d4c"):
        restore_checkpoint(runs / "step-00000020", saved["client"])
    with pytest.raises(CheckpointCorrupt, match="has no manifest.json"):
        checkpoint.inspect_checkpoint(partial)
    assert checkpoint.latest_checkpoint(runs) == runs / "step-00000010"


CRASHING_SAVE = """
import sys, time
from pathlib import Path
from memory_service.durability.checkpoint import CheckpointOptions, save_checkpoint
from memory_service.client import MemoryClient

class Stall:
    # pickled into the dense part, after the shards wrote their files: says so, then waits to be killed
    def __reduce__(self):
        Path(sys.argv[2]).touch()
        time.sleep(600)

with MemoryClient(sys.argv[3].split(","), hot_targets=sys.argv[4].split(","), shared_memory=False) as client:
    save_checkpoint(sys.argv[1], client, extra={"stall": Stall()}, options=CheckpointOptions(lease_s=1.0))
"""


def test_a_driver_killed_mid_save_leaves_nothing_that_passes_for_a_checkpoint(saved, tmp_path):
    """kill -9 of the saving process after the shards wrote their files, before the manifest: what
    it leaves ('ck.partial-*', with the shards' files) is refused, and 'ck' does not exist."""
    cluster = saved["cluster"]
    (tmp_path / "crash.py").write_text(CRASHING_SAVE)
    marker = tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "crash.py"), str(tmp_path / "ck"), str(marker),
                             ",".join(cluster.targets), ",".join(cluster.hot_targets)], env=os.environ)
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), f"the save never reached its dense part (exit {proc.poll()})"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    partial = list(tmp_path.glob("ck.partial-*"))
    assert len(partial) == 1 and not (tmp_path / "ck").exists()
    assert {p.name for p in partial[0].iterdir()} >= {"shard-0000-of-0002", "shard-0001-of-0002", "hot-0000-of-0001"}
    assert not (partial[0] / "manifest.json").exists()
    with pytest.raises(CheckpointCorrupt, match="unfinished saves beside it: ck.partial-"):
        restore_checkpoint(tmp_path / "ck", saved["client"])
    with pytest.raises(CheckpointCorrupt, match="has no manifest.json"):
        checkpoint.inspect_checkpoint(partial[0])


def test_a_pause_holds_while_renewed_and_lapses_without_its_driver(make_cluster):
    """The save's pause of migration is a lease the driver renews: it holds for longer than the
    lease while renewed, and a pause nobody renews or resumes (its driver died) lapses."""
    cluster = make_cluster(1, num_hot=1, hot_rows=32, migrate_interval_s=0.005, migrate_max_duty=1.0)
    rounds = lambda: ray.get(cluster.hot_actors[0].migration_counters.remote())["rounds"]
    with cluster.client(shared_memory=False) as client:
        client.create_table(TableConfig("lease", 100, 4))
        read = lambda: client.fetch({"lease": np.arange(50)})  # reads: the migrator has work to plan

        def reading(seconds: float) -> None:
            for _ in range(int(seconds / 0.05)):
                read()
                time.sleep(0.05)

        with checkpoint._migration_paused(client, CheckpointOptions(lease_s=0.6)):
            before = rounds()
            reading(1.5)
            assert rounds() == before
        client.stubs[1].CheckpointPause(memory_pb2.CheckpointPauseRequest(
            pause=True, lease_seconds=3.0, timeout_seconds=5), timeout=10)  # and then its driver "dies"
        before = rounds()
        read()
        assert rounds() == before  # within its lease: held
        lapsed = time.monotonic() + 30  # a loaded machine's rounds come late, never early
        while rounds() == before and time.monotonic() < lapsed:
            reading(0.2)
        assert rounds() > before


def test_engram_checkpoint_save_restore_inspect(saved, make_cluster, tmp_path, capsys):
    from trainer.cli import main

    address = ray.get_runtime_context().gcs_address
    source = saved["cluster"].config.name
    path = tmp_path / "cli-ck"
    assert main(["checkpoint", "save", str(path), "--address", address, "--name", source]) == 0
    step = saved["client"].stats()[0].tables[0].step
    assert f"saved {path}: step {step}" in capsys.readouterr().out
    assert main(["checkpoint", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"step {step}" in out and "2 cold + 1 hot shards: 2 tables" in out and "files match their sha256" in out
    for name in NAMES:
        assert f"{name}: " in out
    assert main(["checkpoint", "inspect", str(path), "--json", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == step
    target = make_cluster(2)
    assert main(["checkpoint", "restore", str(path), "--address", address, "--name", target.config.name]) == 0
    assert "restored" in capsys.readouterr().out
    with target.client() as client:
        assert {t.name: t.step for t in client.stats()[0].tables} == {name: step for name in NAMES}
    assert main(["checkpoint", "restore", str(path), "--address", address, "--name", target.config.name]) == 1
    assert "holds table" in capsys.readouterr().err
