"""The compiled loops (memory_service/native/kernels.c) against their numpy references, bit for
bit: the same random batches through both paths (`kernels.numpy_reference()` switches the
compiled ones off), on a real TableStore where the loop is a step of it."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.ids import SlotIndex
from memory_service.native import compiled, kernels
from memory_service.shard.request_checks import sum_duplicates
from memory_service.storage.catch_up import AdamDecay, CatchUpStats, catch_up, catch_up_state
from memory_service.storage.store import TableStore
from memory_service.storage.tiers.dram import DramTier

KINDS = ("sgd", "adagrad", "sparse_adam", "adam")


def test_extension_is_built():
    """pip install builds the extension (setup.py); a wheel or install without it would run the
    slow numpy paths silently."""
    assert compiled.AVAILABLE, "memory_service.native._kernels is not built: pip install the package"
    assert kernels.active()


def both(fn, rng: np.random.Generator | None = None):
    """fn() run on the compiled path, then on the numpy reference (drawing `rng`'s same numbers)."""
    state = rng.bit_generator.state if rng is not None else None
    native = fn()
    if rng is not None:
        rng.bit_generator.state = state
    with kernels.numpy_reference():
        reference = fn()
    return native, reference


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bit for bit (nan patterns and -0.0 included)


def test_slot_index_lookup_with_tombstones():
    rng = np.random.default_rng(0)

    def run():
        index, held = SlotIndex(), np.zeros(0, np.int64)
        found = []
        for _ in range(30):
            new = np.setdiff1d(rng.integers(0, 5000, 200), held)
            index.insert(new, new * 3)
            held = np.union1d(held, new)
            gone = rng.choice(held, len(held) // 4, replace=False)  # leaves tombstones
            index.remove(gone)
            held = np.setdiff1d(held, gone)
            index.move(held[:10], held[:10] + 1)
            found.append(index.lookup(rng.integers(0, 6000, 500)))
            found.append(index.lookup(np.zeros(0, np.int64)))
        return found

    assert_same(*both(run, rng))


def test_arena_gather_scatter():
    rng = np.random.default_rng(1)

    def run():
        arena = DramTier(8, 16)
        ids = rng.permutation(3000)[:1000]
        arena.append(ids, rng.standard_normal((1000, 8), dtype=np.float32),
                     rng.standard_normal((1000, 16), dtype=np.float32), rng.integers(0, 9, 1000))
        slots = rng.choice(1000, 300, replace=False)
        arena.write_at(slots, rng.standard_normal((300, 8), dtype=np.float32),
                       rng.standard_normal((300, 16), dtype=np.float32), rng.integers(0, 9, 300))
        repeats = rng.integers(0, 1000, 700)
        return arena.rows_at(repeats), arena.records_at(repeats), arena.records_at(np.zeros(0, np.int64))

    assert_same(*both(run, rng))
    with pytest.raises(IndexError):
        kernels.gather(np.zeros((4, 2), np.float32), np.array([4]))


@pytest.mark.parametrize("num_distinct", [1, 7, 500])
def test_sum_duplicates(num_distinct):
    rng = np.random.default_rng(num_distinct)
    ids = rng.integers(0, num_distinct, 2000) * 7
    grads = rng.standard_normal((2000, 24)).astype(np.float32) * np.float32(1e3)
    assert_same(*both(lambda: sum_duplicates(ids, grads)))
    distinct = rng.permutation(100)
    assert_same(*both(lambda: sum_duplicates(distinct, grads[:100])))


def run_store(kind: str, seed: int, steps: int = 40, num_rows: int = 3000) -> dict:
    """A table through reads and pushes: duplicates summed first, empty pushes, rows never
    written, lr changing every step, rows skipping many steps (adam's catch-up), gradients at
    scales from 1e-7 (sigma near eps: the step-by-step loop) to 10."""
    rng = np.random.default_rng(seed)
    cfg = TableConfig(f"t-{kind}", num_rows, 16, init_scale=0.05, seed=3,
                      optimizer=OptimizerConfig(kind, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                                                initial_accumulator_value=0.1))
    store, reads = TableStore(cfg), []
    for step in range(1, steps + 1):
        hot = rng.random() < 0.5
        ids = rng.integers(0, 40 if hot else num_rows, rng.integers(0, 400))
        reads.append(store.read(np.unique(rng.integers(0, num_rows, 300))))
        grads = rng.standard_normal((len(ids), 16)).astype(np.float32)
        grads *= np.float32(10.0 ** rng.integers(-7, 2))
        ids, grads = sum_duplicates(ids, grads)
        store.update(ids, grads, step, lr=1e-2 * (1 + np.cos(step)))
    reads.append(store.read(np.arange(num_rows)))
    return {"reads": reads, "state": store.state_dict(), "digest": store.digest()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_store_bit_identical(kind, seed):
    native, reference = both(lambda: run_store(kind, seed))
    assert native["digest"] == reference["digest"]
    assert_same(native, reference)


def test_catch_up_edge_rows():
    """Rows with m = 0, v = 0, sigma near eps and long gaps, through catch_up_state and catch_up."""
    rng = np.random.default_rng(5)
    n, w, target = 400, 8, 300
    decay = AdamDecay.of(0.9, 0.95, 1e-8)
    lrs = 1e-2 * (1 + np.cos(np.arange(target + 1)))
    j = np.arange(target + 1, dtype=np.float64)
    ss = (lrs / np.where(j > 0, 1 - 0.9**j, 1)).astype(np.float32).astype(np.float64)
    bsq = np.sqrt(1 - 0.95**j).astype(np.float32).astype(np.float64)
    rows = rng.standard_normal((n, w)).astype(np.float32)
    m = (rng.standard_normal((n, w)) * 10.0 ** rng.integers(-9, 0, (n, 1))).astype(np.float32)
    v = (m.astype(np.float64) ** 2 * rng.uniform(1, 50, (n, w))).astype(np.float32)
    m[:20] = 0  # still rows
    v[20:30, 0] = 0
    m[20:25, 0] = 0
    last = rng.integers(0, target, n)
    for case in (slice(None), slice(30, None), slice(40, 41)):
        r, st, ll = rows[case].copy(), np.concatenate([m, v], axis=1)[case].copy(), last[case].copy()
        mm, vv = m[case].copy(), v[case].copy()
        ref_rows, ref_last = r.copy(), ll.copy()
        stats, ref_stats = CatchUpStats(), CatchUpStats()
        catch_up_state(r, st, ll, target, ss, bsq, decay, stats)
        catch_up(ref_rows, mm, vv, ref_last, target, ss, bsq, decay, ref_stats)
        assert_same((r, st, ll), (ref_rows, np.concatenate([mm, vv], axis=1), ref_last))
        assert stats == ref_stats
    assert stats.series_elements and stats.loop_elements  # both branches, rows of each in one batch
    # in place on arenas, rows picked by index (RowWriter.catch_up_arena), as on a gathered copy
    at = rng.permutation(n)[: n // 2]
    r, st, ll = rows.copy(), np.concatenate([m, v], axis=1), last.copy()
    ref_rows, mm, vv, ref_last = rows[at], m[at], v[at], last[at]
    catch_up_state(r, st, ll, target, ss, bsq, decay, CatchUpStats(), at)
    catch_up(ref_rows, mm, vv, ref_last, target, ss, bsq, decay, CatchUpStats())
    assert_same((r[at], st[at], ll[at]), (ref_rows, np.concatenate([mm, vv], axis=1), ref_last))
    untouched = np.setdiff1d(np.arange(n), at)
    assert_same((r[untouched], ll[untouched]), (rows[untouched], last[untouched]))
