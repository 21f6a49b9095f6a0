"""Placement policies: the plan contract for every policy, the pieces of the engram policy (sketch,
look-ahead, admission), and the acceptance on the corpus's own row trace against Belady."""
import numpy as np
import pytest

from memory_service.ids import check_ids
from memory_service.placement import POLICIES, EngramPolicy, LFUPolicy, Policy, RecentPolicy, make_policy
from memory_service.placement.lookahead import Lookahead
from memory_service.placement.policy import select
from memory_service.placement.sketch import CountMinSketch
from memory_service.placement.replay import belady_hit_rate, num_reads, simulate


def zipf_batches(seed: int, num_batches: int = 60, draws: int = 80, num_rows: int = 400, a: float = 1.3):
    """Requests of distinct ids, drawn from a Zipf law over `num_rows` rows (ids scrambled)."""
    rng = np.random.default_rng(seed)
    scramble = rng.permutation(num_rows)
    return [np.unique(scramble[(rng.zipf(a, draws) - 1) % num_rows]).astype(np.int64) for _ in range(num_batches)]


def replay_checked(policy: Policy, batches, max_moves, lookahead: int = 2):
    """Drive `policy` as the service does and check every plan against the contract; the plans."""
    resident, plans = np.zeros(0, np.int64), []
    for t, batch in enumerate(batches):
        policy.record(batch)
        for ahead in batches[t + 1:t + 1 + lookahead] if t == 0 else batches[t + lookahead:t + lookahead + 1]:
            policy.expect(ahead)
        admit, evict = policy.plan(resident, max_moves)
        assert len(np.unique(admit)) == len(admit) and len(np.unique(evict)) == len(evict)
        assert not np.isin(admit, resident).any(), "admitted a resident row"
        assert np.isin(evict, resident).all(), "evicted a row not resident"
        assert np.isin(admit, batch).all(), "admitted a row not read since the last plan"
        assert len(resident) - len(evict) + len(admit) <= policy.capacity
        if max_moves is not None:
            assert len(admit) <= max_moves
        resident = np.sort(np.concatenate([np.setdiff1d(resident, evict), admit]))
        plans.append((admit, evict))
    return plans


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("max_moves", [None, 7])
@pytest.mark.parametrize("capacity", [0, 1, 30])
def test_plans_keep_the_contract(name, max_moves, capacity):
    plans = replay_checked(make_policy(name, capacity), zipf_batches(seed=1), max_moves)
    if capacity:
        assert sum(len(a) for a, _ in plans) > 0  # the tier fills
    else:
        assert all(len(a) == 0 for a, _ in plans)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_tier_over_capacity_sheds_rows(name):
    """A caller that shrank the tier gets it back under capacity at the next plan."""
    policy = make_policy(name, 5)
    policy.record(np.arange(3, dtype=np.int64))
    resident = np.arange(10, 20, dtype=np.int64)
    admit, evict = policy.plan(resident)
    assert len(resident) - len(evict) + len(admit) <= 5


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_plans_repeat_for_the_same_seed(name):
    first = replay_checked(make_policy(name, 25), zipf_batches(seed=2), None)
    second = replay_checked(make_policy(name, 25), zipf_batches(seed=2), None)
    for (a1, e1), (a2, e2) in zip(first, second):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(e1, e2)


def test_random_eviction_depends_on_its_seed():
    batches = zipf_batches(seed=3)
    plans = [replay_checked(make_policy("random", 25, seed=seed), batches, None) for seed in (0, 1)]
    assert any(not np.array_equal(e0, e1) for (_, e0), (_, e1) in zip(*plans))


def test_lru_evicts_the_least_recently_read():
    policy = make_policy("lru", 2)
    for ids in ([1], [2], [1]):
        policy.record(np.array(ids))
    admit, evict = policy.plan(np.zeros(0, np.int64))
    np.testing.assert_array_equal(admit, [1, 2])
    policy.record(np.array([3]))
    admit, evict = policy.plan(np.array([1, 2]))
    np.testing.assert_array_equal(admit, [3])
    np.testing.assert_array_equal(evict, [2])  # read before 1's second read


def test_lfu_admits_only_rows_read_more_than_the_row_they_displace():
    policy = LFUPolicy(2)
    for ids in ([1, 2], [1, 2], [3], [3]):
        policy.record(np.array(ids))
    admit, evict = policy.plan(np.array([1, 2]))
    assert admit.size == 0 and evict.size == 0  # 3 ties 1 and 2 at two reads: no churn
    policy.record(np.array([3]))
    admit, evict = policy.plan(np.array([1, 2]))
    np.testing.assert_array_equal(admit, [3])
    assert len(evict) == 1


def rare_frequent_history(policy: Policy) -> None:
    """Rows 1 and 2 read 3 times, row 7 (rare) once, row 9 (frequent) 5 times."""
    for _ in range(3):
        policy.record(np.array([1, 2]))
    policy.record(np.array([7]))
    for _ in range(4):
        policy.record(np.array([9]))
    policy.plan(np.array([1, 7]))  # not applied: it only empties the reads a plan may admit


@pytest.mark.parametrize("policy_cls", [EngramPolicy, LFUPolicy])
def test_the_lookahead_keeps_an_expected_row_lfu_evicts(policy_cls):
    policy = policy_cls(2)
    rare_frequent_history(policy)
    policy.record(np.array([9]))  # the frequent row, read again, wants in
    policy.expect(np.array([7]))  # the next request reads the rare resident row
    admit, evict = policy.plan(np.array([1, 7]))
    np.testing.assert_array_equal(admit, [9])
    expected_victim = 1 if policy_cls is EngramPolicy else 7
    np.testing.assert_array_equal(evict, [expected_victim])


@pytest.mark.parametrize("policy_cls", [EngramPolicy, LFUPolicy])
def test_the_lookahead_admits_a_rare_row_about_to_be_read(policy_cls):
    policy = policy_cls(2)
    rare_frequent_history(policy)
    policy.record(np.array([7]))  # the rare row, read again, is also in the next request
    policy.expect(np.array([7, 9]))
    admit, evict = policy.plan(np.array([1, 2]))
    if policy_cls is EngramPolicy:
        np.testing.assert_array_equal(admit, [7])
        assert len(evict) == 1
    else:
        assert admit.size == 0  # two reads of 7 do not beat three of 1 or 2


def test_nearer_announced_requests_rank_first():
    policy = EngramPolicy(1)
    policy.record(np.array([4, 5]))
    policy.expect(np.array([5]))  # next request
    policy.expect(np.array([4]))  # the one after
    admit, _ = policy.plan(np.zeros(0, np.int64))
    np.testing.assert_array_equal(admit, [5])


def test_lookahead_distances_and_consumption():
    lookahead = Lookahead(max_requests=3)
    lookahead.announce(np.array([3, 1]))
    lookahead.announce(np.array([1, 2]))
    np.testing.assert_array_equal(lookahead.distance(np.array([1, 2, 3, 4])), [0, 1, 0, -1])
    lookahead.consume(np.array([1, 3]))  # the first request's read; 1 is still due in the second
    assert len(lookahead) == 1
    np.testing.assert_array_equal(lookahead.distance(np.array([1, 2, 3])), [0, 0, -1])
    for ids in ([5], [6], [7]):
        lookahead.announce(np.array(ids))
    assert len(lookahead) == 3  # the oldest, never read, dropped
    np.testing.assert_array_equal(lookahead.distance(np.array([1, 5, 7])), [-1, 0, 2])


def test_lookahead_requests_with_steps_merge_and_keep_step_order():
    """A trainer's step reaches each shard in parts, drained in shard order: the parts of one
    step are one request, and requests come in step order whatever order the parts arrive in."""
    lookahead = Lookahead(max_requests=5)
    lookahead.announce(np.array([1]), step=5)
    lookahead.announce(np.array([2]), step=7)
    lookahead.announce(np.array([9]))  # no step: after what came before
    lookahead.announce(np.array([3]), step=6)  # another shard's part of an earlier step
    lookahead.announce(np.array([4, 1]), step=5)
    assert len(lookahead) == 4
    np.testing.assert_array_equal(lookahead.distance(np.array([1, 4, 3, 2, 9])), [0, 0, 1, 2, 3])
    lookahead.consume(np.array([3]))  # step 6's read came first: its request is done, not step 5's
    np.testing.assert_array_equal(lookahead.distance(np.array([1, 2, 9])), [0, 1, 2])
    for step in (8, 9, 10):
        lookahead.announce(np.array([step * 10]), step=step)
    assert len(lookahead) == 5  # the soonest (step 5's, never read) dropped
    np.testing.assert_array_equal(lookahead.distance(np.array([1, 2, 9, 80, 100])), [-1, 0, 1, 2, 4])


def test_sketch_never_undercounts_and_halves():
    rng = np.random.default_rng(0)
    sketch = CountMinSketch(width=256, depth=4)
    assert sketch.nbytes == 2 * 4 * 256
    exact = np.zeros(5000, np.int64)
    for _ in range(200):
        ids = np.unique(rng.zipf(1.2, 50) % 5000)
        sketch.add(ids)
        exact[ids] += 1
    seen = np.flatnonzero(exact)
    estimate = sketch.estimate(seen).astype(np.int64)
    assert (estimate >= exact[seen]).all()
    heavy = seen[np.argsort(exact[seen])[-5:]]
    assert (sketch.estimate(heavy) <= exact[heavy] * 1.5).all()  # heavy rows are near exact
    before = sketch.estimate(seen)
    sketch.halve()
    np.testing.assert_array_equal(sketch.estimate(seen), before // 2)


def test_sketch_counters_saturate():
    sketch = CountMinSketch(width=16, depth=2)
    sketch.counters[:] = np.iinfo(np.uint16).max - 1
    sketch.add(np.array([3]))
    sketch.add(np.array([3]))
    assert sketch.estimate(np.array([3]))[0] == np.iinfo(np.uint16).max


def test_engram_sketch_memory_is_bounded_by_capacity():
    small, large = EngramPolicy(1000), EngramPolicy(1000)
    small.record(np.arange(10, dtype=np.int64))
    large.record(np.arange(0, 10**9, 10**4, dtype=np.int64))  # many distinct, huge ids
    assert small.sketch.nbytes == large.sketch.nbytes == 2 * 4 * 4096


def test_select_breaks_ties_for_resident_rows_and_respects_max_moves():
    resident, candidates = np.array([1, 2, 3]), np.array([7, 8])
    admit, evict = select(resident, np.array([5.0, 1.0, 2.0]), candidates, np.array([2.0, 9.0]), 3, None)
    np.testing.assert_array_equal(admit, [8])  # 7 ties resident row 3: stays out
    np.testing.assert_array_equal(evict, [2])
    admit, evict = select(resident, np.array([5.0, 1.0, 2.0]), candidates, np.array([3.0, 9.0]), 4, 1)
    np.testing.assert_array_equal(admit, [8])  # a free slot, one move allowed
    assert evict.size == 0


class RecentReference:
    """What RecentPolicy must plan, the plain way: the list of the last `capacity` distinct ids
    read, oldest first (the implementation before ticks, which sorted it all on every read)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.recent = capacity, np.empty(0, np.int64)

    def record(self, ids):
        recent = np.concatenate([self.recent[~np.isin(self.recent, ids)], ids])
        self.recent = recent[max(len(recent) - self.capacity, 0):]

    def forget(self, ids):
        self.recent = self.recent[~np.isin(self.recent, ids)]

    def plan(self, resident, max_moves=None):
        wanted = self.recent[::-1]
        admit = wanted[~np.isin(wanted, resident)][:max_moves]
        stale = resident[~np.isin(resident, self.recent)]
        return admit, stale[: max(len(resident) + len(admit) - self.capacity, 0)]


@pytest.mark.parametrize("capacity", [0, 1, 30, 700])
@pytest.mark.parametrize("max_moves", [None, 7])
def test_recent_policy_plans_what_the_plain_list_plans(capacity, max_moves):
    """Random requests (in no id order), forgets and plans, applied to a resident set: the same
    plans as the reference, including after the id list was trimmed (thousands of distinct ids)."""
    rng = np.random.default_rng(capacity)
    policy, reference = RecentPolicy(capacity), RecentReference(capacity)
    resident = np.zeros(0, np.int64)
    for _ in range(300):
        ids = rng.permutation(np.unique(rng.integers(0, 6000 if rng.random() < 0.5 else 200, rng.integers(0, 60))))
        policy.record(ids)
        reference.record(ids)
        if rng.random() < 0.2:
            gone = rng.integers(0, 200, 5)
            policy.forget(np.unique(gone))
            reference.forget(np.unique(gone))
            resident = np.setdiff1d(resident, gone)
        admit, evict = policy.plan(resident, max_moves)
        expected = reference.plan(resident, max_moves)
        np.testing.assert_array_equal(admit, expected[0])
        np.testing.assert_array_equal(evict, expected[1])
        resident = np.sort(np.concatenate([np.setdiff1d(resident, evict), admit]))
        assert len(resident) <= capacity
    assert len(policy._ids) <= capacity + capacity // 4 + 1024 + 60  # trimmed: memory bounded


def test_make_policy_and_checks():
    assert isinstance(make_policy("engram", 10, decay_period=4), EngramPolicy)
    with pytest.raises(ValueError, match="unknown placement policy 'arc'"):
        make_policy("arc", 10)
    with pytest.raises(ValueError, match="capacity -1"):
        make_policy("lru", -1)
    with pytest.raises(ValueError, match="negative row id -3"):
        check_ids("ids", np.array([1, -3]))
    with pytest.raises(ValueError, match="1-D integer"):
        make_policy("lfu", 4).record(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="resident must be sorted and distinct"):
        make_policy("engram", 4).plan(np.array([3, 1]))
    with pytest.raises(ValueError, match="max_moves -1"):
        make_policy("lfu", 4).plan(np.zeros(0, np.int64), max_moves=-1)


# The corpus's own trace (trainer/row_trace.py) on the first eighth of the train split (90 steps per
# epoch): whole layer, 10% of each table's touched rows hot, as bench/bench_tiers.py measures.
# With the next step's fetch alone (1 request ahead) the policy beats every baseline but reaches 0.79
# of Belady here and 0.77 on the full split, where LFU reaches 0.75 and even the static top-C (the rows
# the measured epoch reads most, known in advance) 0.755: on shuffled batches frequency is exhausted.
# 0.85 takes the rows of 6 requests ahead on the full split (0.87 there); the service sees 7 (the held
# fetch + the trainer's 6 announced steps: 0.885, bench/results/tiers_policy.md).
ANNOUNCED_FOR_85 = 6


@pytest.fixture(scope="module")
def corpus_trace():
    from trainer.data import Corpus, CorpusConfig
    from trainer.row_trace import RowTrace
    from trainer.train import TrainConfig, build_indexer

    corpus = Corpus.load(CorpusConfig())
    cfg = TrainConfig()
    tokens = corpus.train[: len(corpus.train) // 8]
    return RowTrace.from_tokens(tokens, build_indexer(cfg, corpus), cfg.model.engram.layer_ids[0])


def layer_hit_rate(trace, rate_of) -> float:
    """Whole-layer hit rate: each table's rate at 10% of its touched rows, weighted by its reads."""
    warmup = trace.steps_per_epoch
    rates, reads = [], []
    for h, batches in enumerate(trace.tables):
        rates.append(rate_of(batches, int(0.1 * trace.touched(h, 1)), warmup))
        reads.append(num_reads(batches, warmup))
    return float(np.dot(rates, reads) / np.sum(reads))


@pytest.mark.slow
def test_acceptance_on_the_corpus_trace(corpus_trace):
    def policy(name, lookahead):
        return lambda batches, c, warmup: simulate(make_policy(name, c), batches, warmup, lookahead)

    belady = layer_hit_rate(corpus_trace, belady_hit_rate)
    engram = layer_hit_rate(corpus_trace, policy("engram", 1))
    for name in ("lfu", "lru", "random"):
        assert engram > layer_hit_rate(corpus_trace, policy(name, 0)), name
    assert engram <= belady
    announced = layer_hit_rate(corpus_trace, policy("engram", ANNOUNCED_FOR_85))
    assert announced >= 0.85 * belady, (announced, belady)


def test_the_lookahead_holds_at_most_max_ids_however_often_a_step_is_announced():
    """Announcements of one step that keep naming new rows (issue 22, finding 6: what a caller
    can make a shard keep) grew its request without end; now every request together holds at most
    max_ids ids, the soonest dropped first."""
    lookahead = Lookahead(max_requests=4, max_ids=1000)
    for i in range(50):
        lookahead.announce(np.arange(i * 100, (i + 1) * 100), step=7)
    assert lookahead.num_ids == 1000 and len(lookahead) == 1
    lookahead.announce(np.arange(10**6, 10**6 + 300), step=8)
    assert lookahead.num_ids <= 1000 and lookahead.distance(np.array([10**6])).tolist() == [0]
    lookahead.consume(np.arange(10**6, 10**6 + 300))
    assert lookahead.num_ids == 0
