"""A training step's requests: the next announcement rides on the step's push (checked with it,
handed to placement once it is applied, never logged), and where rows cannot move the commit rides
on it too, so a step costs one request per shard; the results are the same as the separate
requests', and a re-sent push is applied (and announced) once."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import InvalidArgument
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import Announcement, TablePush

CFGS = [TableConfig(name, 1000, 4, seed=i, optimizer=OptimizerConfig("adam", lr=0.1)) for i, name in enumerate("ab")]


class CountingShard(Shard):
    """A real shard that counts the requests of each kind it served (what a step costs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"push": 0, "commit": 0, "announce": 0}

    def push(self, *args, **kwargs):
        self.calls["push"] += 1
        return super().push(*args, **kwargs)

    def commit(self, *args, **kwargs):
        self.calls["commit"] += 1
        return super().commit(*args, **kwargs)

    def announce(self, *args, **kwargs):
        self.calls["announce"] += 1
        return super().announce(*args, **kwargs)


def served_shards(num_shards: int, cls=Shard, hot: bool = False):
    """`num_shards` cold shards (and one hot shard after them), created and served."""
    shards = [cls(i, num_shards, track_accesses=True) for i in range(num_shards)]
    shards += [cls(0, 1, role="hot", track_accesses=True)] if hot else []
    for shard in shards:
        for cfg in CFGS:
            shard.create_table(cfg)
    return shards, [serve(shard) for shard in shards]


def step_grads(step: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(step)
    return {cfg.name: (rng.integers(0, 40, 64), rng.standard_normal((64, 4)).astype(np.float32)) for cfg in CFGS}


def train(client: MemoryClient, steps: int, announce: bool) -> dict[str, np.ndarray]:
    """`steps` pushes with the next step's ids announced on each (or not); the rows after."""
    for step in range(1, steps + 1):
        ahead = Announcement({name: ids for name, (ids, _) in step_grads(step + 1).items()}, step) if announce else None
        client.push(step_grads(step), step, lr=0.05, announce=ahead)
    return client.fetch({cfg.name: np.arange(40) for cfg in CFGS}, min_step=steps)


def test_a_step_is_one_request_per_shard_with_the_same_rows():
    """Without hot shards each shard gets one Push per step (the commit and the announcement on
    it), and the rows equal those of pushes whose commit and announcement went separately."""
    shards, servers = served_shards(2, CountingShard)
    plain, plain_servers = served_shards(2, hot=True)  # beside a hot shard (holding no row): commits alone
    try:
        with MemoryClient([s.address for s in servers]) as client, \
                MemoryClient([s.address for s in plain_servers[:2]], hot_targets=[plain_servers[2].address]) as separate:
            rows = train(client, 3, announce=True)
            for step in range(1, 4):
                separate.push(step_grads(step), step, lr=0.05)
                separate.announce({name: ids for name, (ids, _) in step_grads(step + 1).items()}, step).result()
            expected = separate.fetch({cfg.name: np.arange(40) for cfg in CFGS}, min_step=3)
    finally:
        for server in servers + plain_servers:
            server.stop(grace=None)
    for name in rows:
        np.testing.assert_array_equal(rows[name].numpy(), expected[name].numpy())
    for shard in shards:
        assert shard.calls == {"push": 3, "commit": 0, "announce": 0}
        assert all(shard.describe_table(cfg.name).step == 3 for cfg in CFGS)
    for shard, plain_shard in zip(shards, plain):
        assert shard.digest() == plain_shard.digest()
        assert [tag for tag, _ in shard.drain_accesses()["a"] if tag >= 0] == [1, 2, 3]  # announced, in order


def test_a_bad_announcement_refuses_the_push_whole():
    shard = Shard(0, 1, track_accesses=True)
    for cfg in CFGS:
        shard.create_table(cfg)
    before = shard.digest()
    push = {"a": TablePush(1, np.array([1, 2]), np.ones((2, 4), np.float32))}
    for bad in (Announcement({"a": np.array([1000])}, 2), Announcement({"a": np.array([1])}, -1),
                Announcement({"nope": np.array([1])}, 2)):
        with pytest.raises((InvalidArgument, ValueError, LookupError)):
            shard.push("c", push, request_seq=7, announce=bad)
    assert shard.digest() == before and shard.drain_accesses() == {}
    assert shard.push("c", push, request_seq=7, announce=Announcement({"b": np.array([5, 5, 9])}, 2)) == 2
    assert shard.push("c", push, request_seq=7, announce=Announcement({"b": np.array([5])}, 2)) == 2  # re-sent
    assert [(tag, ids.tolist()) for tag, ids in shard.drain_accesses()["b"]] == [(2, [5, 5, 9])]  # once


def test_hot_shards_keep_the_commit_of_its_own():
    """A client beside hot shards cannot let the commit ride (a refused request's rows land on
    another shard later): push, then CommitStep; the announcement still rides."""
    shards, servers = served_shards(1, CountingShard, hot=True)
    try:
        with MemoryClient([servers[0].address], hot_targets=[servers[1].address]) as client:
            train(client, 2, announce=True)  # no row is hot: every push goes to the cold shard
    finally:
        for server in servers:
            server.stop(grace=None)
    assert shards[0].calls == {"push": 2, "commit": 2, "announce": 0}
    assert shards[1].calls == {"push": 0, "commit": 2, "announce": 0}  # the hot shard: its commits only
