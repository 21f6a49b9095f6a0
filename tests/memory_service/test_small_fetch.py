"""The decode-sized short path (MemoryClient.fetch_stacked_async, wire/small_fetch.py): the same
rows as a fetch per table, repeats and hot rows included; rows that moved after the client routed
them are fetched again from their new home; bad ids are refused before anything is sent."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import InvalidArgument
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from memory_service.wire import small_fetch

CFGS = [TableConfig(f"t{k}", 500 + k, 4, seed=k, optimizer=OptimizerConfig("adam", lr=0.1)) for k in range(8)]
NAMES = [cfg.name for cfg in CFGS]


@pytest.fixture
def shards():
    """2 cold shards and a hot one, every table pushed once, served."""
    shards = [Shard(0, 2), Shard(1, 2), Shard(0, 1, role="hot")]
    for shard in shards:
        for cfg in CFGS:
            shard.create_table(cfg)
    rng = np.random.default_rng(0)
    for i, shard in enumerate(shards[:2]):
        ids = np.arange(i, 400, 2)
        shard.push("setup", {cfg.name: TablePush(1, ids, rng.standard_normal((len(ids), 4)).astype(np.float32))
                             for cfg in CFGS})
    shards[2].commit("setup", {cfg.name: (1, None) for cfg in CFGS})
    servers = [serve(shard) for shard in shards]
    yield shards, servers
    for server in servers:
        server.stop(grace=None)


def client_of(servers) -> MemoryClient:
    return MemoryClient([s.address for s in servers[:2]], hot_targets=[servers[2].address])


def move_to_hot(shards, name: str, ids: np.ndarray, version: int) -> None:
    """Rows `ids` of `name` (all on cold shard 0) leave it for the hot shard, as the migrator moves them."""
    records = shards[0].export_rows(name, ids, version)
    shards[2].import_rows(name, records, version, ids)


@pytest.mark.parametrize("n", [1, 3, 16])
def test_stacked_rows_equal_a_fetch_per_table(shards, n):
    shards, servers = shards
    move_to_hot(shards, "t2", np.array([0, 2, 4]), version=1)
    ids = np.random.default_rng(n).integers(0, 500, (8, n))
    ids[:, -1] = ids[:, 0]  # repeats
    ids[2, 0] = 2  # a hot row
    with client_of(servers) as client:
        got = client.fetch_stacked_async(NAMES, ids, min_step=1).result()  # (K, n, w)
        want = client.fetch(dict(zip(NAMES, ids)), min_step=1)
    assert got.shape == (8, n, 4)
    for k, name in enumerate(NAMES):
        np.testing.assert_array_equal(got[k].numpy(), want[name].numpy())


def test_rows_that_moved_after_routing_are_fetched_from_their_new_home(shards):
    shards, servers = shards
    ids = np.tile(np.array([[0, 2, 7]]), (8, 1))
    with client_of(servers) as client:
        before = client.fetch_stacked_async(NAMES, ids).result()  # routes with the hot maps as they are
        move_to_hot(shards, "t5", np.array([2]), version=1)  # the client has not heard
        refreshes = client.refreshes
        after = client.fetch_stacked_async(NAMES, ids).result()
        assert client.refreshes == refreshes + 1  # refused, refreshed, fetched again
    np.testing.assert_array_equal(after.numpy(), before.numpy())  # the row moved with its value


def test_bad_ids_and_shapes_are_refused(shards):
    _, servers = shards
    with client_of(servers) as client:
        with pytest.raises(InvalidArgument, match="t1.*row id 501 out of range"):
            client.fetch_stacked_async(NAMES, np.where(np.arange(8)[:, None] == 1, 501, 0))
        with pytest.raises(InvalidArgument, match="K = 8"):
            client.fetch_stacked_async(NAMES, np.zeros((7, 2), np.int64))
        big = np.zeros((8, small_fetch.MAX_SMALL_ROWS // 8 + 1), np.int64)  # past the short path: the general one
        assert client.fetch_stacked_async(NAMES, big).result().shape == (*big.shape, 4)
