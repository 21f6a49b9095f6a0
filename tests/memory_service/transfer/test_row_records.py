"""Shard.write_records / read_records (the WriteRecords and ReadRecords rpcs' logic): a write is in
the write-ahead log before it returns, so a shard killed right after comes back with it (rows,
state, last steps and step log); a rejected write changes nothing; reads return never-written rows
as their initial rows with last step -1."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.rows import init_rows
from memory_service.shard.shard import Shard
from memory_service.storage.tiers.base import RowRecords

CFG = TableConfig("ns/t", 1000, 4, seed=3, optimizer=OptimizerConfig("adam", lr=0.1))
LOG = {"step": np.int64(3), "steps": np.array([1, 2, 3]), "lrs": np.array([0.1, 0.2, 0.3])}

_CHILD = r"""
import sys
import numpy as np
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.shard.shard import Shard
from memory_service.storage.tiers.base import RowRecords
shard = Shard(0, 1, StorageConfig(path=sys.argv[1], flush_interval_s=3600.0, flush_wal_bytes=1 << 40))
shard.create_table(TableConfig("ns/t", 1000, 4, seed=3, optimizer=OptimizerConfig("adam", lr=0.1)))
ids = np.arange(0, 1000, 7)
shard.write_records("ns/t", RowRecords(ids, np.full((len(ids), 4), 0.5, np.float32),
                    np.full((len(ids), 8), 0.25, np.float32), np.full(len(ids), 3)), True,
                    {"step": np.int64(3), "steps": np.array([1, 2, 3]), "lrs": np.array([0.1, 0.2, 0.3])})
print("written", flush=True)
import time
time.sleep(600)  # killed before
"""


def records(n: int, state_width: int = 8, value: float = 0.5, last: int = 2) -> RowRecords:
    ids = np.arange(0, 7 * n, 7)
    return RowRecords(ids, np.full((n, 4), value, np.float32), np.full((n, state_width), 0.25, np.float32),
                      np.full(n, last))


def test_a_write_survives_a_kill(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "written\n"
    child.kill()
    child.wait()
    shard = Shard(0, 1, StorageConfig(path=str(tmp_path)))
    try:
        got = shard.read_records("ns/t", np.arange(0, 1000, 7)[:5])
        np.testing.assert_array_equal(got.rows, 0.5)
        np.testing.assert_array_equal(got.state, 0.25)
        np.testing.assert_array_equal(got.last, 3)
        assert shard.step_log("ns/t")["step"] == 3
        np.testing.assert_array_equal(shard.step_log("ns/t")["lrs"], LOG["lrs"])
    finally:
        shard.close()


def test_reads_of_never_written_rows_and_rejections():
    shard = Shard(0, 1)
    shard.create_table(CFG)
    got = shard.read_records("ns/t", np.array([5, 5, 9]))
    np.testing.assert_array_equal(got.rows, init_rows(CFG.seed, np.array([5, 5, 9]), CFG.width) * CFG.init_scale)
    np.testing.assert_array_equal(got.last, -1)
    before = shard.digest()
    bad = records(4)
    bad.rows[2, 1] = np.nan
    with pytest.raises(InvalidArgument, match="finite"):
        shard.write_records("ns/t", bad, True, LOG)
    with pytest.raises(InvalidArgument, match="distinct"):
        shard.write_records("ns/t", RowRecords(*(np.concatenate([a, a]) for a in (bad.ids, records(4).rows,
                                                                              records(4).state, records(4).last))), True)
    with pytest.raises(InvalidArgument, match="step log"):
        shard.write_records("ns/t", records(4), True, {**LOG, "steps": np.array([1, 3, 2])})
    assert shard.digest() == before
    assert shard.write_records("ns/t", records(4), True, LOG) == 4
    assert shard.write_records("ns/t", records(4), True, LOG) == 4  # a resumed import sends the log again
    with pytest.raises(FailedPrecondition, match="step log"):
        shard.write_records("ns/t", records(4), True, {**LOG, "lrs": np.array([0.1, 0.2, 0.4])})
