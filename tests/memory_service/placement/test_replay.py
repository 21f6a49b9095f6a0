"""Replays: Belady's MIN is the optimum of the batched on-demand semantics (checked against an
exhaustive search), bounds every policy, and the replay rejects plans that break the contract."""
from itertools import combinations

import numpy as np
import pytest

from memory_service.placement import POLICIES, LFUPolicy, make_policy
from memory_service.placement.replay import belady_hit_rate, num_reads, simulate


def random_batches(seed: int, num_batches: int, num_rows: int, max_size: int):
    rng = np.random.default_rng(seed)
    return [np.unique(rng.integers(0, num_rows, rng.integers(1, max_size + 1))) for _ in range(num_batches)]


def optimum_hits(batches, capacity: int, warmup: int) -> int:
    """Most hits any placement gets: every tier content reachable under the semantics (after a
    request, keep any <= capacity rows among those held and those just read), searched in full."""
    best = {frozenset(): 0}  # tier content -> most hits so far
    for t, batch in enumerate(batches):
        read = set(batch.tolist())
        nxt: dict[frozenset, int] = {}
        for held, hits in best.items():
            hits += len(held & read) if t >= warmup else 0
            pool = sorted(held | read)
            for k in range(min(capacity, len(pool)) + 1):
                for keep in combinations(pool, k):
                    key = frozenset(keep)
                    nxt[key] = max(nxt.get(key, -1), hits)
        best = nxt
    return max(best.values())


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_the_optimum(seed):
    capacity, warmup = 1 + seed % 3, seed % 4
    batches = random_batches(seed, num_batches=9, num_rows=6, max_size=3)
    reads = num_reads(batches, warmup)
    assert belady_hit_rate(batches, capacity, warmup) * reads == pytest.approx(optimum_hits(batches, capacity, warmup))


def zipf_batches(seed: int, num_batches: int = 120, draws: int = 60, num_rows: int = 600):
    rng = np.random.default_rng(seed)
    return [np.unique((rng.zipf(1.2, draws) - 1) % num_rows).astype(np.int64) for _ in range(num_batches)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("capacity", [5, 40, 150])
def test_belady_bounds_every_policy(seed, capacity):
    batches = zipf_batches(seed)
    belady = belady_hit_rate(batches, capacity, warmup_batches=40)
    for name in POLICIES:
        for lookahead in (0, 1, 4):
            rate = simulate(make_policy(name, capacity), batches, 40, lookahead)
            assert 0 <= rate <= belady + 1e-12, (name, lookahead, rate, belady)


def test_capacity_zero_and_full():
    batches = zipf_batches(0)
    assert belady_hit_rate(batches, 0, 40) == 0.0
    assert simulate(make_policy("engram", 0), batches, 40) == 0.0
    everything = len(np.unique(np.concatenate(batches)))
    # a tier that holds every row misses each row only on its first read
    seen_before = set(np.concatenate(batches[:40]).tolist())
    first_reads = len(set(np.concatenate(batches[40:]).tolist()) - seen_before)
    hits = num_reads(batches, 40) - first_reads
    assert belady_hit_rate(batches, everything, 40) * num_reads(batches, 40) == pytest.approx(hits)
    assert simulate(make_policy("lru", everything), batches, 40) * num_reads(batches, 40) == pytest.approx(hits)


class PrefetchingPolicy(LFUPolicy):
    """Breaks the on-demand contract: admits the announced rows before anyone read them."""

    def __init__(self, capacity):
        super().__init__(capacity)
        self.announced = np.zeros(0, np.int64)

    def expect(self, ids, step=None):
        self.announced = ids

    def plan(self, resident, max_moves=None):
        super().plan(resident, max_moves)
        admit = np.setdiff1d(self.announced, resident)[: max(0, self.capacity - len(resident))]
        return admit, np.zeros(0, np.int64)


def test_replay_rejects_a_prefetching_policy():
    with pytest.raises(RuntimeError, match="not read since its last plan"):
        simulate(PrefetchingPolicy(50), zipf_batches(1), 10, lookahead=1)


def test_replay_checks_its_arguments():
    batches = zipf_batches(0, num_batches=5)
    with pytest.raises(ValueError, match="warmup_batches 6"):
        simulate(make_policy("lru", 3), batches, 6)
    with pytest.raises(ValueError, match="lookahead -1"):
        simulate(make_policy("lru", 3), batches, 0, lookahead=-1)
    with pytest.raises(ValueError, match="capacity -2"):
        belady_hit_rate(batches, -2, 0)
