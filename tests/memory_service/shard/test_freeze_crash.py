"""A cold shard killed (SIGKILL) in the middle of freezing a table loses nothing: killed once the
frozen copy is staged in LMDB but before the swap, it reopens with the table as it was (unfrozen,
same rows, optimizer state and step, the staged copy gone); killed right after the swap, before
the closing checkpoint, it reopens with the table frozen. The crash points are pauses added in the
child around the real DiskEnvironment.replace_table, where the test kills it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.shard.shard import Shard
from memory_service.shard.table_stores import STAGED
from memory_service.tables import TablePush

ROOT = Path(__file__).resolve().parents[3]
CFG = TableConfig("m/t", 3000, 8, init_scale=0.1, seed=3, optimizer=OptimizerConfig("adam", lr=0.05))
CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from memory_service.storage.tiers.disk import DiskEnvironment
from tests.memory_service.shard.test_freeze_crash import open_shard, train
real = DiskEnvironment.replace_table

def replace_table(self, name, staged):
    if {before!r}:
        print("staged", flush=True); time.sleep(60)
    real(self, name, staged)
    print("swapped", flush=True); time.sleep(60)

DiskEnvironment.replace_table = replace_table
shard = open_shard({path!r})
train(shard)
shard.freeze_table("m/t", "int8")
"""


def open_shard(path) -> Shard:
    """A cold shard whose DRAM holds a few dozen rows (most rows in LMDB), with the table."""
    shard = Shard(0, 1, StorageConfig(path=str(path), dram_budget_bytes=24 << 10, placement_interval_s=0.01,
                                      flush_interval_s=3600.0, flush_wal_bytes=1 << 40))
    shard.create_table(CFG)
    return shard


def train(shard: Shard) -> None:
    """Five dense-Adam steps over a spread of rows (some left behind, to be caught up)."""
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        ids = rng.choice(CFG.num_rows, 400, replace=False)
        grads = rng.standard_normal((len(ids), CFG.width)).astype(np.float32)
        shard.push("t", {CFG.name: TablePush(step, ids, grads)})


def killed_at(path, point: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(path),
                                                                 before=point == "staged")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == f"{point}\n"
    finally:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(the table's records before the freeze, after it), from the same work done whole. Before:
    as a read leaves them (a freeze reads every row first, and dense Adam's read brings each up to
    the table's step)."""
    states = []
    for frozen in (False, True):
        shard = open_shard(tmp_path_factory.mktemp("reference"))
        train(shard)
        if frozen:
            shard.freeze_table(CFG.name, "int8")
        else:
            shard.fetch({CFG.name: np.arange(CFG.num_rows)})
        states.append(shard.table_state(CFG.name))
        shard.close()
    return states


def assert_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("point", ["staged", "swapped"])
def test_a_freeze_killed_midway_loses_nothing(tmp_path, reference, point):
    killed_at(tmp_path, point)
    shard = Shard(0, 1, StorageConfig(path=str(tmp_path)))
    try:
        cfg = shard.describe_table(CFG.name).config
        assert cfg.frozen == (point == "swapped")
        assert not any(name.startswith(STAGED) for name in shard._tables.disk.tables())
        assert_state(shard.table_state(CFG.name), reference[point == "swapped"])
    finally:
        shard.close()
