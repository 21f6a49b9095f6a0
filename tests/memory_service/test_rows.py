"""Initial rows: bit-equal to numpy's Philox, independent of which rows are asked together."""
import numpy as np
import pytest

from memory_service.native import compiled
from memory_service.rows import InitialRows, init_rows, init_rows_many, philox4x64, philox4x64_numpy, table_seed


@pytest.mark.parametrize("seed", [0, 7, 2**63 + 12345])
def test_philox_matches_numpy(seed):
    rng = np.random.default_rng(1)
    counters = rng.integers(0, 2**63, size=(5, 4), dtype=np.int64).astype(np.uint64)
    ours = philox4x64(counters + np.array([1, 0, 0, 0], dtype=np.uint64), (seed, 3))
    for c, row in zip(counters, ours):
        ref = np.random.Philox(key=np.array([seed, 3], dtype=np.uint64), counter=c).random_raw(4)
        np.testing.assert_array_equal(row, ref)


def test_compiled_philox_equals_the_numpy_reference():
    assert compiled.AVAILABLE, "memory_service.native is not built: pip install -e . builds it"
    rng = np.random.default_rng(2)
    counters = rng.integers(0, 2**64, size=(4097, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**64, size=(2, 4097), dtype=np.uint64)
    for key in ((2**64 - 1, 5), keys):  # one key for all, a key per counter
        np.testing.assert_array_equal(philox4x64(counters, key), philox4x64_numpy(counters, key))
    assert philox4x64(counters[:0], (1, 2)).shape == (0, 4)


def test_block_layout_matches_numpy_philox():
    seed, row, width = 99, 123456789, 9
    bits = np.random.Philox(key=np.array([seed, 0], dtype=np.uint64),
                            counter=np.array([0, row, 0, 0], dtype=np.uint64)).random_raw(4)
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53 + 2.0**-54
    first = np.sqrt(-2 * np.log(u[0])) * np.cos(2 * np.pi * u[1])
    assert init_rows(seed, np.array([row]), width)[0, 0] == np.float32(first)


def test_rows_independent_of_batch_and_order():
    ids = np.array([5, 0, 99_999_999, 42, 5])
    together = init_rows(11, ids, 32, scale=0.5)
    alone = np.stack([init_rows(11, np.array([i]), 32, scale=0.5)[0] for i in ids])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together[0], together[4])
    assert together.dtype == np.float32 and together.shape == (5, 32)


def test_rows_are_standard_normal_scaled():
    x = init_rows(3, np.arange(4000), 64, scale=0.02)
    assert abs(x.mean()) < 0.02 * 0.01
    assert abs(x.std() / 0.02 - 1) < 0.01
    assert not np.array_equal(init_rows(3, [1], 8), init_rows(4, [1], 8))


def test_table_seed_distinct_and_stable():
    seeds = {table_seed(0, layer, order, head) for layer in range(3) for order in (2, 3) for head in range(8)}
    assert len(seeds) == 48
    assert table_seed(0, 1, 2, 3) == table_seed(0, 1, 2, 3)


def test_bad_input_names_value():
    with pytest.raises(ValueError, match="row id -1"):
        init_rows(0, np.array([3, -1]), 4)
    with pytest.raises(ValueError, match="width 0"):
        init_rows(0, np.array([3]), 0)


def test_initial_rows_remember_what_a_read_computed():
    rows = InitialRows(seed=3, width=12, scale=0.1, keep=2)
    read = np.array([40, 7, 7, 1000])
    np.testing.assert_array_equal(rows(read, remember=True), init_rows(3, read, 12, 0.1))
    assert rows.computed == 4
    push = np.array([7, 1000, 5])  # two read before, one new
    np.testing.assert_array_equal(rows(push), init_rows(3, push, 12, 0.1))
    assert rows.computed == 5  # only id 5 was computed again
    rows(np.array([1]), remember=True), rows(np.array([2]), remember=True)  # keep=2: the first read is forgotten
    rows(np.array([40]))
    assert rows.computed == 8


def test_initial_rows_remember_at_most_max_bytes():
    rows = InitialRows(seed=3, width=16, scale=1.0, keep=2, max_bytes=64 * 16 * 4)  # 64 rows
    big = np.arange(100)
    rows(big, remember=True)
    rows(big)
    assert rows.computed == 200  # a batch larger than its share (32 rows) is not kept


def test_init_rows_many_is_init_rows_of_each_table():
    """Tables of several widths, scales and sizes (none, one, many rows) in one pass: each equals
    its own `init_rows` bit for bit (a per-row key must not leak across tables)."""
    rng = np.random.default_rng(0)
    tables = [(2**64 - 1, rng.integers(0, 10**6, 1), 64, 0.1), (3, np.zeros(0, np.int64), 64, 0.5),
              (3, rng.integers(0, 10**6, 17), 64, 1.0), (7, rng.integers(0, 10**6, 5), 30, 0.05),
              (8, np.array([4, 4, 9]), 30, 2.0), (3, np.array([11]), 7, 1.0)]
    got = init_rows_many(tables)
    for (seed, ids, width, scale), rows in zip(tables, got):
        assert rows.shape == (len(ids), width) and rows.dtype == np.float32
        np.testing.assert_array_equal(rows, init_rows(seed, ids, width, scale))
    with pytest.raises(ValueError, match="negative"):
        init_rows_many([(1, np.array([1]), 4, 1.0), (2, np.array([-1]), 4, 1.0)])


def test_requests_larger_than_a_pass_are_computed_in_passes_bit_for_bit():
    # 2^18 values a pass (rows._PASS_VALUES): 70 rows of width 8192 take 3 passes, with two seeds
    # and scales interleaved across the passes' boundaries
    from memory_service import rows

    ids = np.arange(70) * 3
    assert len(ids) * 8192 > 2 * rows._PASS_VALUES
    whole = init_rows(5, ids, 8192, 0.5)
    np.testing.assert_array_equal(whole, np.concatenate([init_rows(5, ids[i:i + 1], 8192, 0.5) for i in range(70)]))
    mixed = init_rows_many([(5, ids[:40], 8192, 0.5), (6, ids[40:], 8192, 2.0)])
    np.testing.assert_array_equal(mixed[0], whole[:40])
    np.testing.assert_array_equal(mixed[1], init_rows(6, ids[40:], 8192, 2.0))
