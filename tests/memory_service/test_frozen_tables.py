"""Frozen and quantized tables through real served shards (MemoryClient.freeze_table,
Shard.freeze_table): a freeze keeps rows bit for bit or within the quantization's bound, drops the
optimizer state, survives a restart of a cold shard with LMDB and its write-ahead log and a
checkpoint, refuses pushes and commits with FAILED_PRECONDITION without changing anything, and
is idempotent."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service import quantization
from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.durability.checkpoint import restore_checkpoint, save_checkpoint
from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

WIDTH = 12
ADAM = TableConfig("ns/adam", 400, WIDTH, seed=3, optimizer=OptimizerConfig("adam", lr=0.05))
SPARSE = TableConfig("ns/sparse", 400, WIDTH, seed=4, dtype="bfloat16")
TABLES = (ADAM, SPARSE)
IDS = np.arange(0, 300, 3)  # written rows (every shard's), and some never written below
READ = np.concatenate([IDS, np.arange(301, 400, 7), IDS[:5]])  # written, never written, repeats


def trained_shards(path) -> list[Shard]:
    """2 cold shards on LMDB and a hot one, every table pushed for 2 steps, rows 0 and 3 hot."""
    storage = StorageConfig(path=str(path), dram_budget_bytes=1 << 16)
    hot = StorageConfig(checkpoint_root=storage.checkpoint_dir)
    shards = [Shard(0, 2, storage.for_shard(0)), Shard(1, 2, storage.for_shard(1)), Shard(0, 1, hot, role="hot")]
    rng = np.random.default_rng(0)
    for shard in shards:
        for cfg in TABLES:
            shard.create_table(cfg)
    for step in (1, 2):
        for i, shard in enumerate(shards[:2]):
            ids = IDS[IDS % 2 == i]
            shard.push("t", {cfg.name: TablePush(step, ids, rng.standard_normal((len(ids), WIDTH)).astype(np.float32))
                             for cfg in TABLES})
        shards[2].commit("t", {cfg.name: (step, None) for cfg in TABLES})
    for cfg in TABLES:
        records = shards[0].export_rows(cfg.name, np.array([0]), version=1)
        shards[2].import_rows(cfg.name, records, 1, np.array([0]))
    return shards


@pytest.fixture
def served(tmp_path):
    shards = trained_shards(tmp_path / "data")
    servers = [serve(shard) for shard in shards]
    client = MemoryClient([s.address for s in servers[:2]], hot_targets=[servers[2].address])
    yield shards, servers, client, tmp_path
    client.close()
    for server in servers:
        server.stop(grace=None)
    for shard in shards:
        shard.close()


def fetch(client: MemoryClient, name: str, ids=READ) -> np.ndarray:
    return client.fetch({name: ids})[name].numpy()


def shard_rows(shards: list[Shard], name: str, ids=READ) -> np.ndarray:
    """Rows (n, width) float32 as the shards hold them (a bf16 table's unrounded), each from its
    home: row 0 on the hot shard, the others on cold shard id % 2."""
    homes = np.where(ids == 0, 2, ids % 2)
    out = np.empty((len(ids), WIDTH), np.float32)
    for k, shard in enumerate(shards):
        out[homes == k] = shard.fetch({name: ids[homes == k]})[name]
    return out


def test_freeze_keeps_rows_bit_for_bit_and_drops_optimizer_state(served):
    shards, _, client, _ = served
    before = {cfg.name: fetch(client, cfg.name) for cfg in TABLES}
    for cfg in TABLES:
        frozen = client.freeze_table(cfg.name)
        assert frozen.frozen and frozen.quantization == "none"
        np.testing.assert_array_equal(fetch(client, cfg.name), before[cfg.name])
        for shard in shards:
            assert shard.state_width(cfg.name) == 0
            assert shard.table_state(cfg.name)["state"].shape[1] == 0
    assert shards[2].hot_map(ADAM.name)[1].tolist() == [0]  # hot rows stay hot, frozen


@pytest.mark.parametrize("kind", ["fp8_e4m3", "int8"])
def test_quantized_fetch_is_within_the_bound(served, kind):
    shards, _, client, _ = served
    for cfg in TABLES:
        before = shard_rows(shards, cfg.name)
        client.freeze_table(cfg.name, kind)
        got = fetch(client, cfg.name)
        assert got.dtype == np.float32 and got.shape == before.shape
        err = np.abs(got.astype(np.float64) - before)
        assert (err <= quantization.bound(before, kind)).all()
        # the same rows as the shards' own packed rows, dequantized: reads are consistent
        np.testing.assert_array_equal(got, quantization.dequantize(quantization.quantize(before, kind), WIDTH, kind))


def test_pushes_and_commits_of_a_frozen_table_are_refused_and_change_nothing(served):
    shards, _, client, _ = served
    client.freeze_table(ADAM.name, "int8")
    digests = [shard.digest() for shard in shards]
    grads = np.ones((4, WIDTH), np.float32)
    with pytest.raises(FailedPrecondition, match="frozen"):
        client.push({ADAM.name: (np.arange(4), grads), SPARSE.name: (np.arange(4), grads)}, step=3)
    with pytest.raises(FailedPrecondition, match="frozen"):
        shards[0].commit("c", {ADAM.name: (3, None)})
    assert [shard.digest() for shard in shards] == digests
    client.push({SPARSE.name: (np.arange(4), grads)}, step=3)  # the table beside it still trains


def test_freeze_is_idempotent_and_refuses_another_quantization(served):
    shards, _, client, _ = served
    client.freeze_table(SPARSE.name, "fp8_e4m3")
    digests = [shard.digest() for shard in shards]
    client.freeze_table(SPARSE.name, "fp8_e4m3")
    assert [shard.digest() for shard in shards] == digests
    with pytest.raises(FailedPrecondition, match="quantization"):
        client.freeze_table(SPARSE.name, "int8")
    with pytest.raises(InvalidArgument, match="quantization"):
        client.freeze_table(ADAM.name, "fp4")
    assert not shards[0].describe_table(ADAM.name).config.frozen


def test_frozen_quantized_table_survives_a_restart_and_a_checkpoint(served):
    shards, _, client, tmp_path = served
    client.freeze_table(ADAM.name, "int8")
    want = shards[0].table_state(ADAM.name)
    got_rows = fetch(client, ADAM.name, IDS[IDS % 2 == 0][1:])  # cold shard 0's rows
    shards[0].close()
    reopened = Shard(0, 2, StorageConfig(path=str(tmp_path / "data"), dram_budget_bytes=1 << 16).for_shard(0))
    try:
        cfg = reopened.describe_table(ADAM.name).config
        assert cfg.frozen and cfg.quantization == "int8"
        state = reopened.table_state(ADAM.name)
        for key in ("ids", "rows", "state", "last"):
            np.testing.assert_array_equal(state[key], want[key])
        rows = reopened.fetch({ADAM.name: IDS[IDS % 2 == 0][1:]})[ADAM.name]
        np.testing.assert_array_equal(quantization.dequantize(rows, WIDTH, "int8"), got_rows)
    finally:
        reopened.close()


def test_quantization_requires_frozen():
    with pytest.raises(ValueError, match="requires a frozen table"):
        TableConfig("t", 10, 4, quantization="int8")
    with pytest.raises(ValueError, match="quantization"):
        TableConfig("t", 10, 4, frozen=True, quantization="fp4")
    assert TableConfig("t", 10, 160, frozen=True, quantization="fp8_e4m3").stored_width * 4 == 164


def test_stats_report_bytes_per_row(served):
    shards, _, client, _ = served
    client.freeze_table(ADAM.name, "fp8_e4m3")
    usage = {t.name: t for t in client.report().shards[0].tables}
    frozen, trained = usage[ADAM.name], usage[SPARSE.name]
    assert frozen.wire_row_bytes == 16 and trained.wire_row_bytes == 2 * WIDTH  # 4 + 12 codes; bf16
    assert frozen.disk_row_bytes == 16 + 8 and trained.disk_row_bytes == 4 * 3 * WIDTH + 8  # no Adam moments
    assert frozen.dram_row_bytes == 16 + 17 and trained.dram_row_bytes == 4 * 3 * WIDTH + 17


def test_checkpoint_of_a_frozen_table_restores_it_frozen(served):
    shards, _, client, tmp_path = served
    client.freeze_table(ADAM.name, "fp8_e4m3")
    want = fetch(client, ADAM.name)
    save_checkpoint(tmp_path / "data" / "checkpoints" / "c1", client, tables=[ADAM.name])
    restore_checkpoint(tmp_path / "data" / "checkpoints" / "c1", client, replace=True)
    assert all(shard.describe_table(ADAM.name).config.quantization == "fp8_e4m3" for shard in shards)
    np.testing.assert_array_equal(fetch(client, ADAM.name), want)


def test_freeze_waits_for_an_incomplete_step(served):
    shards, _, _, _ = served
    shards[0].push("t", {ADAM.name: TablePush(3, np.array([2]), np.ones((1, WIDTH), np.float32))}, commit=False)
    digest = shards[0].digest()
    with pytest.raises(FailedPrecondition, match="incomplete step"):
        shards[0].freeze_table(ADAM.name, "int8")
    assert shards[0].digest() == digest
    shards[0].commit("t", {ADAM.name: (3, None)})
    assert shards[0].freeze_table(ADAM.name, "int8").config.frozen


def test_packed_rows_move_between_cold_and_hot_shards(served):
    """A frozen quantized table's rows move as the migrator moves them (ExportRows' message, its
    records decoded at the stored width, ImportRows), bytes untouched: no finite check on codes."""
    from memory_service.wire import codec

    shards, _, client, _ = served
    client.freeze_table(ADAM.name, "int8")
    ids = np.array([6, 12, 13])  # written and never written rows of cold shard 0... and 13 of shard 1
    want = fetch(client, ADAM.name, ids)
    for k, moved in ((0, np.array([6, 12])), (1, np.array([13]))):
        records = shards[k].export_rows(ADAM.name, moved, version=2)
        cfg = shards[2].describe_table(ADAM.name).config
        message = codec.records_to_proto(ADAM.name, records)
        shards[2].import_rows(ADAM.name, codec.records_from_proto(message, cfg.stored_width, 0), 2, moved)
    client._refresh_hot([ADAM.name])
    np.testing.assert_array_equal(fetch(client, ADAM.name, ids), want)
    assert shards[2].hot_map(ADAM.name)[1].tolist() == [0, 6, 12, 13]


@pytest.mark.parametrize("ids", [np.arange(4), np.arange(5000)])  # the decode-sized path and the general one
def test_a_client_that_cached_the_config_before_a_freeze_is_told(served, ids):
    _, servers, client, _ = served
    with MemoryClient([s.address for s in servers[:2]], hot_targets=[servers[2].address]) as stale:
        stale.table(SPARSE.name)
        client.freeze_table(SPARSE.name, "int8")
        with pytest.raises(FailedPrecondition, match="open a new client"):
            stale.fetch({SPARSE.name: ids % SPARSE.num_rows})
