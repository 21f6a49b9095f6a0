"""The router's compiled loops (memory_service/native/routing.c) against their numpy references,
bit for bit: dedup with its inverse (both the bitmap path for dense keys and the radix path for
sparse ones) and the gather back into the caller's order, fp32 and bf16 widened."""
import numpy as np
import pytest

from memory_service.native import compiled
from memory_service.router import Router, gather, gather_reference, unique_inverse, unique_inverse_reference

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="memory_service.native not built (pip install -e .)")

KEYS = [  # (n, key range): dense ones take the bitmap, sparse ones the radix sort
    (0, 10), (1, 1), (1, 1 << 40), (7, 3), (1000, 100), (16384, 262144), (5000, 1 << 62), (3000, 1 << 33),
]


@pytest.mark.parametrize("n, high", KEYS)
def test_unique_inverse_equals_np_unique(n, high):
    keys = np.random.default_rng(n).integers(0, high, size=n, dtype=np.int64)
    if n > 2:
        keys[: n // 3] = keys[n // 3: 2 * (n // 3)]  # duplicates, whatever the range
    unique, inverse = unique_inverse(keys)
    ref_unique, ref_inverse = unique_inverse_reference(keys)
    np.testing.assert_array_equal(unique, ref_unique)
    np.testing.assert_array_equal(inverse, ref_inverse)
    assert unique.dtype == inverse.dtype == np.int64


def test_unique_inverse_rejects_negative_keys():
    with pytest.raises(ValueError, match="key -1 at 1 must be >= 0"):
        compiled._routing.unique_inverse(np.array([3, -1]), np.empty(2, np.int64), np.empty(2, np.int64))


@pytest.mark.parametrize("dtype, widen", [(np.float32, False), (np.uint16, False), (np.uint16, True)])
@pytest.mark.parametrize("u, n, width", [(1, 1, 1), (50, 200, 3), (4096, 16384, 64)])
def test_gather_equals_take(dtype, widen, u, n, width):
    rng = np.random.default_rng(u)
    rows = rng.integers(0, 1 << 16, size=(u, width)).astype(dtype)  # (u, width): any bit pattern widens
    index = rng.integers(0, u, size=n)  # (n,)
    got = gather(rows, index, widen)
    want = gather_reference(rows, index, widen)
    assert got.dtype == want.dtype and got.shape == want.shape == (n, width)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # bit for bit, NaNs included


def test_gather_rejects_an_index_out_of_range():
    rows = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"index 4 at 1 out of range \[0, 4\)"):
        compiled._routing.gather_rows(rows, 8, np.array([0, 4]), np.empty((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"index -1 at 0 out of range"):
        compiled._routing.gather_bf16(rows.view(np.uint16), 4, np.array([-1]), np.empty((1, 4), np.float32))


@pytest.mark.parametrize("num_cold, num_hot", [(2, 0), (3, 2)])
def test_route_is_the_same_with_and_without_the_compiled_loops(monkeypatch, num_cold, num_hot):
    rng = np.random.default_rng(7)
    num_rows = 100_003
    ids = rng.integers(0, num_rows, size=(4, 3000))
    routes = []
    for available in (True, False):
        monkeypatch.setattr(compiled, "AVAILABLE", available)
        router = Router(num_cold, num_hot)
        if num_hot:
            router.set_hot("t", rng.choice(num_rows, 5000, replace=False) if available else hot)
            hot = router.hot_ids("t")
        routes.append(router.route("t", ids, num_rows))
    native, reference = routes
    for field in ("grouped", "index", "bounds"):
        np.testing.assert_array_equal(getattr(native, field), getattr(reference, field))
    rows = rng.standard_normal((len(native.grouped), 5)).astype(np.float32)
    np.testing.assert_array_equal(native.reassemble(rows), reference.reassemble(rows))
