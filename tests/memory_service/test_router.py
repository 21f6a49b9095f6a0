"""Router: the client's pure routing on real numpy arrays, no gRPC, against a brute-force statement
of the rules (home = cold shard id % N, or hot shard N + id % H while the id is hot; distinct ids
grouped by home, then by id; requests within the row and byte limits; rows back in the caller's
order and shape)."""
import numpy as np
import pytest

from memory_service.errors import InvalidArgument
from memory_service.router import ID_BYTES, Route, Router

SIZES = [  # (num_cold, num_hot, num_rows, num_ids, max_rows_per_request)
    (1, 0, 10, 1, 1),
    (1, 0, 1000, 500, 64),
    (3, 0, 1001, 2000, 100),  # num_rows not a multiple of the shards: the cold route's key trick
    (4, 0, 97, 300, 7),
    (2, 1, 1000, 1500, 128),
    (3, 2, 5003, 4000, 333),
    (5, 3, 200, 999, 10),
]


def brute_home(ids, num_cold: int, num_hot: int, hot: set[int]) -> list[int]:
    return [num_cold + i % num_hot if i in hot else i % num_cold for i in ids]


def make_case(num_cold, num_hot, num_rows, num_ids, seed=0):
    rng = np.random.default_rng(seed)
    shape = (num_ids,) if num_ids % 3 else (3, num_ids // 3)
    ids = rng.integers(0, num_rows, size=shape)
    hot = set(rng.choice(num_rows, size=num_rows // 4, replace=False).tolist()) if num_hot else set()
    router = Router(num_cold, num_hot, max_rows_per_request=64)
    if hot:
        router.set_hot("t", np.array(sorted(hot) * 2)[::-1])  # unsorted, duplicated: set_hot sorts and dedups
    return router, ids, hot


@pytest.mark.parametrize("num_cold, num_hot, num_rows, num_ids, max_rows", SIZES)
def test_route_groups_distinct_ids_by_home_shard(num_cold, num_hot, num_rows, num_ids, max_rows):
    router, ids, hot = make_case(num_cold, num_hot, num_rows, num_ids)
    route = router.route("t", ids, num_rows)

    distinct = sorted(set(ids.reshape(-1).tolist()))
    homes = dict(zip(distinct, brute_home(distinct, num_cold, num_hot, hot)))
    expected = sorted(distinct, key=lambda i: (homes[i], i))
    np.testing.assert_array_equal(route.grouped, expected)
    assert route.grouped.dtype == np.int64 and route.shape == ids.shape
    assert len(route.bounds) == num_cold + num_hot + 1 and route.bounds[0] == 0 and route.bounds[-1] == len(expected)
    for shard in range(num_cold + num_hot):
        assert all(homes[i] == shard for i in route.ids_of(shard).tolist()), shard
        assert len(route.ids_of(shard)) == sum(h == shard for h in homes.values()), shard
    np.testing.assert_array_equal(router.home_of("t", route.grouped), [homes[i] for i in expected])


@pytest.mark.parametrize("num_cold, num_hot, num_rows, num_ids, max_rows", SIZES)
def test_reassemble_puts_rows_back_in_caller_order_and_shape(num_cold, num_hot, num_rows, num_ids, max_rows):
    router, ids, _ = make_case(num_cold, num_hot, num_rows, num_ids, seed=1)
    route = router.route("t", ids, num_rows)
    rows_of = lambda x: np.stack([x, 10 * x + 1, -x], axis=-1).astype(np.float32)  # noqa: E731  (*x.shape, 3)
    got = route.reassemble(rows_of(route.grouped))  # as if each shard answered its slice
    assert got.shape == (*ids.shape, 3)
    np.testing.assert_array_equal(got, rows_of(ids))


@pytest.mark.parametrize("num_cold, num_hot, num_rows, num_ids, max_rows", SIZES)
@pytest.mark.parametrize("row_bytes", [16, 4096])
def test_requests_cover_each_shard_in_order_within_the_limits(num_cold, num_hot, num_rows, num_ids, max_rows,
                                                              row_bytes):
    max_bytes = 20 * (row_bytes + ID_BYTES)  # the byte limit binds for the wide rows
    router = Router(num_cold, num_hot, max_rows_per_request=max_rows, max_request_bytes=max_bytes)
    _, ids, hot = make_case(num_cold, num_hot, num_rows, num_ids, seed=2)
    if hot:
        router.set_hot("a", np.array(sorted(hot)))
    routes = {"a": router.route("a", ids, num_rows), "b": router.route("b", ids.reshape(-1)[::2], num_rows)}
    requests = router.requests(routes, {"a": row_bytes, "b": 8})

    assert [shard for shard, _ in requests] == sorted(shard for shard, _ in requests)  # shard order
    covered = {(name, shard): [] for name in routes for shard in range(router.num_shards)}
    for shard, chunk in requests:
        assert chunk and all(stop > start for _, start, stop in chunk)  # no empty requests
        assert sum(stop - start for _, start, stop in chunk) <= max_rows
        assert sum((stop - start) * ({"a": row_bytes, "b": 8}[name] + ID_BYTES)
                   for name, start, stop in chunk) <= max(max_bytes, row_bytes + ID_BYTES)
        for name, start, stop in chunk:
            covered[name, shard].extend(range(start, stop))
    for (name, shard), positions in covered.items():  # each shard's slice exactly, in order
        route = routes[name]
        assert positions == list(range(route.bounds[shard], route.bounds[shard + 1])), (name, shard)


def test_cold_only_routes_ignore_hot_shards_until_a_map_names_rows():
    router = Router(2, 1)
    route = router.route("t", np.array([5, 4, 5, 1]), 10)
    np.testing.assert_array_equal(route.grouped, [4, 1, 5])  # shard 0: 4; shard 1: 1, 5
    np.testing.assert_array_equal(route.bounds, [0, 1, 3, 3])  # the hot shard gets nothing
    assert not router.knows_hot("t") and len(router.hot_ids("t")) == 0
    router.set_hot("t", np.array([5]))
    assert router.knows_hot("t")
    np.testing.assert_array_equal(router.route("t", np.array([5, 4, 5, 1]), 10).grouped, [4, 1, 5])
    np.testing.assert_array_equal(router.route("t", np.array([5, 4, 5, 1]), 10).bounds, [0, 1, 2, 3])


def test_route_checks_ids_at_the_edge():
    router = Router(3)
    with pytest.raises(InvalidArgument, match=r"table 't': row id 10 out of range \[0, 10\)"):
        router.route("t", np.array([[1, 10]]), 10)
    with pytest.raises(InvalidArgument, match=r"table 't': row id -1 out of range"):
        router.route("t", np.array([-1]), 10)
    with pytest.raises(InvalidArgument, match="row ids must be integers, got dtype float64"):
        router.route("t", np.array([1.0]), 10)
    assert isinstance(router.route("t", np.array([], np.uint32), 10), Route)


@pytest.mark.parametrize("kw, match", [(dict(num_cold=0), "num_cold 0"), (dict(num_cold=1, num_hot=-1), "num_hot -1"),
                                       (dict(num_cold=1, max_rows_per_request=0), "max_rows_per_request 0")])
def test_bad_routers_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Router(**kw)
