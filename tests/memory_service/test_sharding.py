"""Sharding: row r on shard r % N; split_by_shard positions reassemble the caller's order."""
import numpy as np
import pytest

from memory_service.sharding import shard_of, split_by_shard


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_split_round_trip(num_shards):
    ids = np.random.default_rng(num_shards).integers(0, 10**12, size=1000)
    ids[10:20] = ids[0]  # duplicates stay, each at its own position
    positions = split_by_shard(ids, num_shards)
    assert len(positions) == num_shards
    np.testing.assert_array_equal(np.sort(np.concatenate(positions)), np.arange(len(ids)))
    rebuilt = np.empty_like(ids)
    for shard, pos in enumerate(positions):
        assert pos.dtype == np.int64 and np.all(np.diff(pos) > 0)  # caller's order kept
        assert np.all(ids[pos] % num_shards == shard)
        rebuilt[pos] = ids[pos]
    np.testing.assert_array_equal(rebuilt, ids)


def test_shard_of_is_modulo_and_spreads_evenly():
    ids = np.arange(12)
    np.testing.assert_array_equal(shard_of(ids, 4), [0, 1, 2, 3] * 3)
    counts = np.bincount(shard_of(np.random.default_rng(0).integers(0, 2**62, 40_000), 4))
    assert counts.min() > 0.95 * counts.max()


def test_empty_ids_and_bad_num_shards():
    assert [len(p) for p in split_by_shard(np.array([], dtype=np.int64), 3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="num_shards 0 must be >= 1"):
        split_by_shard(np.arange(3), 0)
