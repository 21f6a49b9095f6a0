"""Placement: which rows of a table a faster tier keeps, decided from the reads it sees.

N-gram reads are Zipf-distributed, so a small share of rows takes most lookups. A `Policy` watches
the reads of one table (`record`), is told which rows a look-ahead request says will be read soon
(`expect`), and on a background thread, between requests, plans moves in batches (`plan`): rows
to admit into the tier and rows to evict from it, keeping at most `capacity` rows there. Requests
never wait for a decision; a tier serves what it holds and the rest comes from the tier below.

The same interface places rows between a cold shard's DRAM and its LMDB files and between cold
shards and the GPU-resident hot shards.

Admission is on demand: a policy admits only rows read since its last `plan` (their values just
came up from the tier below, so promoting them costs no extra read). Admitting a row nobody read
yet would be a prefetch, whose read still lands on the tier below; the hit rate would then count
reads the tier did not save, and Belady's MIN (memory_service/placement/replay.py) would no longer
bound it. Every policy may decline: a just-read row that ranks below every resident row stays out.

Policies (`make_policy(name, capacity)`):
- "engram" (`EngramPolicy`, the default): frequencies from a count-min sketch of bounded size,
  halved periodically so old popularity fades; TinyLFU-style admission (a row comes in only if it
  ranks above the row it would displace) and the look-ahead: rows of announced requests are kept
  and admitted first, nearest request first, since each is a hit that soon whatever its frequency.
- "lfu" (`LFUPolicy`): exact read counts since the start, the C most-read rows kept.
- "lru" (`LRUPolicy`): every read row comes in, the least recently read rows go out.
- "random" (`RandomPolicy`): every read row comes in, random resident rows go out (seeded).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from memory_service.ids import check_ids, contains, sorted_unique


# Tags of the events queued on their way to a policy ((tag, ids), as shards keep them and
# TableAccesses carries them): a read, or a look-ahead not told its step; other look-aheads carry
# the step they are for (>= 0).
READ, UNTAGGED = -1, -2


def tell(policy: "Policy", tag: int, ids: np.ndarray) -> None:
    """Hands `policy` one queued event: `record` for a READ, else `expect` with its step."""
    if tag == READ:
        policy.record(ids)
    else:
        policy.expect(ids, None if tag == UNTAGGED else tag)


class Policy(ABC):
    """Placement of one table's rows in one tier of `capacity` rows.

    Called from one background thread: `record` after each request with the distinct ids it read,
    `expect` with the distinct ids a look-ahead request will read, `plan` between requests. The
    caller applies (admit, evict) before the next `plan`; `resident` is the tier's content then.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity {capacity} must be >= 0")
        self.capacity = capacity

    @abstractmethod
    def record(self, ids: np.ndarray) -> None:
        """The distinct row ids (n,) int64 one request read (hits and misses alike)."""

    def expect(self, ids: np.ndarray, step: int | None = None) -> None:
        """Distinct row ids (n,) a look-ahead request will read soon (default: ignored). `step`
        names the request: the ids of several calls with one step are one request (a trainer's
        step reaches each shard in parts), and requests with steps are read in step order. Without,
        each call is a request of its own, read after those announced before it. A later
        `record` of an id fulfils its earliest announcement."""

    def forget(self, ids: np.ndarray) -> None:
        """Distinct row ids (n,) the tier can no longer hold (moved to another shard, or never
        stored): not to be admitted until recorded again (default: ignored; a policy that keeps
        them only wastes admission attempts)."""

    @abstractmethod
    def plan(self, resident: np.ndarray, max_moves: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(admit, evict): distinct ids not in `resident` (sorted distinct ids now in the tier) to
        bring in, and ids of `resident` to move out, so that len(resident) - len(evict) +
        len(admit) <= capacity; at most `max_moves` admissions when given. Admitted ids are
        among those recorded since the previous `plan` (on-demand admission, see the module doc)."""


def check_resident(resident: np.ndarray) -> np.ndarray:
    """`resident` as checked ids that are also sorted and distinct, as `plan` promises to read them."""
    resident = check_ids("resident", resident)
    if resident.size > 1 and not (resident[1:] > resident[:-1]).all():
        raise ValueError("resident must be sorted and distinct (the tier's row ids, ascending)")
    return resident


def check_max_moves(max_moves: int | None) -> None:
    if max_moves is not None and max_moves < 0:
        raise ValueError(f"max_moves {max_moves} must be >= 0 or None")


class Reads:
    """The distinct ids recorded since the last `take`: the rows a plan may admit."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def add(self, ids: np.ndarray) -> None:
        self._parts.append(ids)

    def take(self) -> np.ndarray:
        """Sorted distinct ids (m,) recorded since the last take; empties the record."""
        ids = sorted_unique(np.concatenate(self._parts)) if self._parts else np.zeros(0, np.int64)
        self._parts = []
        return ids


def plan_by_keys(reads: Reads, resident: np.ndarray, max_moves: int | None, capacity: int,
                 keys_of: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The plan every policy here makes: the ids read since the last plan that are not resident are
    the candidates; `keys_of(resident, candidates)` ranks both; `select` keeps the best."""
    check_max_moves(max_moves)
    resident = check_resident(resident)
    candidates = reads.take()
    candidates = candidates[~contains(resident, candidates)]
    resident_keys, candidate_keys = keys_of(resident, candidates)
    return select(resident, resident_keys, candidates, candidate_keys, capacity, max_moves)


def select(resident: np.ndarray, resident_keys: np.ndarray, candidates: np.ndarray, candidate_keys: np.ndarray,
           capacity: int, max_moves: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(admit, evict) keeping the highest keys among resident (r,) and candidates (c,) (disjoint):
    free slots take the best candidates; then the i-th best candidate displaces the i-th worst
    resident row only if its key is strictly higher (ties keep the resident row: no churn). At
    most `max_moves` admissions; a tier over capacity first sheds its lowest rows."""
    over = max(0, len(resident) - capacity)
    free = max(0, capacity - len(resident))
    unopposed = min(free, len(candidates))  # candidates that take free slots
    contest = min(len(candidates) - unopposed, len(resident) - over)
    by_key = np.argsort(-candidate_keys, kind="stable")  # best candidate first
    worst_first = _lowest(resident_keys, over + contest)  # the resident rows that may go, worst first
    wins = candidate_keys[by_key[unopposed:unopposed + contest]] > resident_keys[worst_first[over:]]
    # keys fall along `by_key` and rise along `worst_first`, so wins is a run of True then False
    num_admit = unopposed + int(np.count_nonzero(wins))
    if max_moves is not None:
        num_admit = min(num_admit, max_moves)
    num_evict = over + max(0, num_admit - free)
    return np.sort(candidates[by_key[:num_admit]]), np.sort(resident[worst_first[:num_evict]])


def _lowest(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest keys (n,), lowest first; a partition first, as k is often << n."""
    if k <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(keys, k - 1)[:k] if k < len(keys) else np.arange(len(keys))
    return part[np.argsort(keys[part], kind="stable")]


class Counts:
    """A dense int64 value per row id, grown on demand to the largest id seen (8 bytes a row): a
    policy places one table's rows, whose ids run below the table's size."""

    def __init__(self) -> None:
        self.values = np.zeros(0, np.int64)

    def grow(self, ids: np.ndarray) -> None:
        if ids.size and ids.max() >= len(self.values):
            size = max(int(ids.max()) + 1, len(self.values) * 3 // 2)
            self.values = np.concatenate([self.values, np.zeros(size - len(self.values), np.int64)])

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Values (n,) of ids (n,); 0 for ids never set."""
        known = ids < len(self.values)
        out = np.zeros(len(ids), np.int64)
        out[known] = self.values[ids[known]]
        return out


class LRUPolicy(Policy):
    """Plain LRU: every row read since the last plan comes in; the least recently read go out.
    State: the request number of each row's last read, 8 bytes per row id up to the largest."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._last = Counts()
        self._reads = Reads()
        self._clock = 0

    def record(self, ids: np.ndarray) -> None:
        ids = check_ids("ids", ids)
        self._clock += 1
        self._last.grow(ids)
        self._last.values[ids] = self._clock
        self._reads.add(ids)

    def plan(self, resident, max_moves=None):
        return plan_by_keys(self._reads, resident, max_moves, self.capacity,
                            lambda res, cand: (self._last.get(res), self._last.get(cand)))


class LFUPolicy(Policy):
    """Plain LFU with exact counts: keeps the `capacity` rows read most often since the start; a
    just-read row comes in only if read more often than the resident row it displaces.
    State: one exact count per row id up to the largest seen (8 bytes each)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._counts = Counts()
        self._reads = Reads()

    def record(self, ids: np.ndarray) -> None:
        ids = check_ids("ids", ids)
        self._counts.grow(ids)
        self._counts.values[ids] += 1  # ids are distinct within a request
        self._reads.add(ids)

    def plan(self, resident, max_moves=None):
        return plan_by_keys(self._reads, resident, max_moves, self.capacity,
                            lambda res, cand: (self._counts.get(res), self._counts.get(cand)))


class RandomPolicy(Policy):
    """Random eviction: every row read since the last plan comes in (a random subset when more
    than fit) and uniformly random resident rows go out. Seeded, so runs repeat exactly."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity)
        self._rng = np.random.default_rng(seed)
        self._reads = Reads()

    def record(self, ids: np.ndarray) -> None:
        self._reads.add(check_ids("ids", ids))

    def plan(self, resident, max_moves=None):
        # candidates rank above every resident row (keys + 1): all come in while slots or victims last
        return plan_by_keys(self._reads, resident, max_moves, self.capacity,
                            lambda res, cand: (self._rng.random(len(res)), self._rng.random(len(cand)) + 1.0))


class CountMinSketch:
    """Approximate read counts in `depth` x `width` uint16 counters (2 * depth * width bytes),
    whatever the number of distinct rows. Estimates never undercount (before a halving or
    saturation); the conservative update raises only the counters at a row's current minimum,
    which keeps the overcount from colliding rows low. Counters saturate at 65535: only rows far
    above any tier's admission threshold get there, and they rank equal among themselves. `halve`
    divides every counter by 2, so that popularity decays geometrically with the halvings."""

    def __init__(self, width: int, depth: int = 4, seed: int = 0) -> None:
        if width < 1 or width & (width - 1):
            raise ValueError(f"width {width} must be a power of two >= 1")
        if depth < 1:
            raise ValueError(f"depth {depth} must be >= 1")
        self.width, self.depth = width, depth
        self.counters = np.zeros((depth, width), np.uint16)
        # multiply-shift hashing (Dietzfelbinger): odd 64-bit multipliers, the top log2(width) bits
        rng = np.random.default_rng(seed)
        self._mult = (rng.integers(0, 2**63, size=(depth, 1), dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self._shift = np.uint64(64 - max(1, width.bit_length() - 1))
        self._row_start = (np.arange(depth) * width)[:, None]  # (depth, 1) offsets into the flat counters

    @property
    def nbytes(self) -> int:
        return self.counters.nbytes

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        """Index (depth, n) into the flat counters of each id's counter in each sketch row."""
        if self.width == 1:
            return np.broadcast_to(self._row_start, (self.depth, len(ids))).copy()
        slots = ((ids.astype(np.uint64)[None, :] * self._mult) >> self._shift).view(np.int64)  # (depth, n)
        slots += self._row_start
        return slots

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        """Estimated counts (n,) uint16 of ids (n,)."""
        if ids.size == 0:
            return np.zeros(0, np.uint16)
        return self.counters.reshape(-1).take(self._slots(ids)).min(axis=0)

    def add(self, ids: np.ndarray) -> None:
        """Count one read of each distinct id (n,) (conservative update)."""
        if ids.size == 0:
            return
        flat = self.counters.reshape(-1)  # a view: counters are contiguous
        slots = self._slots(ids)
        current = flat.take(slots).min(axis=0)  # (n,)
        raised = current + (current < np.iinfo(np.uint16).max)  # saturating
        # np.maximum.at: ids sharing a counter within the batch each leave it at least at their own count
        np.maximum.at(flat, slots.reshape(-1), np.tile(raised, self.depth))  # contiguous: ~7x faster

    def halve(self) -> None:
        self.counters >>= 1


class Lookahead:
    """Requests announced by `expect` and not read yet, soonest first, each as the sorted ids (n,)
    of it no read has consumed. A request announced with a step gathers every announcement of
    that step (a trainer's step reaches each shard in parts, drained at different times) and takes
    its place among the other stepped ones by step; one without a step goes last. At most
    `max_requests`, the soonest dropped first (a request announced but never read must not hold
    its rows forever)."""

    def __init__(self, max_requests: int) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests {max_requests} must be >= 1")
        self.max_requests = max_requests
        self._requests: list[np.ndarray] = []
        self._steps: list[int | None] = []  # the step of each request (None: not told)

    def __len__(self) -> int:
        return len(self._requests)

    def announce(self, ids: np.ndarray, step: int | None = None) -> None:
        ids = sorted_unique(ids)
        if step is not None and step in self._steps:
            at = self._steps.index(step)
            self._requests[at] = sorted_unique(np.concatenate([self._requests[at], ids]))
            return
        at = len(self._steps)
        if step is not None:  # before the first later step (requests without a step stay after it)
            at = next((i for i, s in enumerate(self._steps) if s is not None and s > step), at)
        self._requests.insert(at, ids)
        self._steps.insert(at, step)
        if len(self._requests) > self.max_requests:
            del self._requests[0], self._steps[0]

    def consume(self, ids: np.ndarray) -> None:
        """A read of ids (n,) fulfils each one's earliest announcement (a row announced for two
        requests is still about to be read after the first); requests left empty are dropped."""
        remaining = sorted_unique(ids)
        for i, request in enumerate(self._requests):
            if remaining.size == 0:
                break
            read = contains(remaining, request)
            if read.any():
                remaining = remaining[~contains(request[read], remaining)]
                self._requests[i] = request[~read]
        kept = [i for i, r in enumerate(self._requests) if r.size]
        if len(kept) < len(self._requests):
            self._requests = [self._requests[i] for i in kept]
            self._steps = [self._steps[i] for i in kept]

    def distance(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64: for each id, how many announced requests come before the earliest that
        reads it (0: the next one), or -1 when none does."""
        out = np.full(len(ids), -1, np.int64)
        if not self._requests or ids.size == 0:
            return out
        announced = np.concatenate(self._requests)  # (m,)
        position = np.repeat(np.arange(len(self._requests)), [len(r) for r in self._requests])  # (m,)
        order = np.lexsort((position, announced))  # by id, then earliest request first
        first = np.r_[True, announced[order][1:] != announced[order][:-1]]
        keys, nearest = announced[order][first], position[order][first]  # sorted distinct ids, their distance
        at = np.searchsorted(keys, ids).clip(max=len(keys) - 1)
        found = keys[at] == ids
        out[found] = nearest[at[found]]
        return out


class EngramPolicy(Policy):
    """Frequency from a decaying count-min sketch, TinyLFU-style admission, and the look-ahead.

    Rank of a row: first whether a look-ahead request reads it, nearest request first (requests
    in step order, see `Policy.expect`), then its estimated read count. A plan keeps the
    `capacity` best-ranked rows among the resident ones and those just read, so
    - a row of an announced request stays in, or comes in if it was just read, even when rare: it
      is a hit that many requests from now. Belady's MIN keeps the rows read again soonest; the
      look-ahead gives that time exactly for the announced requests and the frequency estimates it
      for the rest. Under shuffled batches there is no other signal to beat plain LFU with
      (reads are exchangeable: recency says nothing), so how far past LFU this policy goes is set
      by how many requests are announced (bench/results/tiers_policy.md);
    - otherwise a just-read row displaces a resident one only if its estimate is strictly higher
      (TinyLFU's admission): one-off rows, a large share of those a table touches, never churn the
      tier.
    Counters are halved after every `decay_period` x `capacity` recorded reads, so popularity fades
    over ~that many reads (TinyLFU's reset): long periods suit the stationary training stream,
    short ones follow drift faster. No LRU admission window (W-TinyLFU's): shuffled training
    batches carry no recency for it to catch; the announced requests are this policy's window.

    Memory: the sketch, 2 * depth * width bytes with width the power of two >= `width_per_row` x
    capacity (256 KiB for 8k rows at the defaults), plus the ids recorded since the last plan and
    those of at most `max_lookahead` announced requests; independent of the table's size and of
    how many distinct rows were read.
    """

    def __init__(self, capacity: int, width_per_row: int = 4, depth: int = 4, decay_period: int = 256,
                 max_lookahead: int = 16, seed: int = 0) -> None:
        super().__init__(capacity)
        if width_per_row < 1 or decay_period < 1:
            raise ValueError(f"width_per_row {width_per_row} and decay_period {decay_period} must be >= 1")
        width = 1 << max(8, int(np.ceil(np.log2(max(1, width_per_row * capacity)))))
        self.sketch = CountMinSketch(width, depth, seed)
        self.decay_every = decay_period * max(1, capacity)
        self.lookahead = Lookahead(max_lookahead)
        self._since_decay = 0
        self._reads = Reads()

    def record(self, ids: np.ndarray) -> None:
        ids = check_ids("ids", ids)
        self.sketch.add(ids)
        self._since_decay += len(ids)
        if self._since_decay >= self.decay_every:
            self.sketch.halve()
            self._since_decay = 0
        self._reads.add(ids)
        self.lookahead.consume(ids)

    def expect(self, ids: np.ndarray, step: int | None = None) -> None:
        """Ids (n,) of a coming request (see Policy.expect)."""
        self.lookahead.announce(check_ids("ids", ids), step)

    def plan(self, resident, max_moves=None):
        return plan_by_keys(self._reads, resident, max_moves, self.capacity, self._rank)

    def _rank(self, resident: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys float64 of both: the estimated count (< 2^16), plus 2^40 x (max_lookahead -
        distance) for a row of an announced request, so the nearest announced rows rank first."""
        ids = np.concatenate([resident, candidates])  # one sketch lookup and one search for both
        distance = self.lookahead.distance(ids)
        boost = np.where(distance >= 0, (self.lookahead.max_requests - distance) * 2.0**40, 0.0)
        keys = self.sketch.estimate(ids).astype(np.float64) + boost
        return keys[:len(resident)], keys[len(resident):]


class RecentPolicy(Policy):
    """Keeps the `capacity` most recently read rows, remembering nothing much older (LRU whose
    memory is bounded by the tier: what a cold shard's DRAM budget needs; "lru" above keeps a slot
    per id up to the largest seen, fine for a replay, not for a 100M-row table). Look-ahead ignored.

    `record` runs inside every read request, so it costs a binary search of the request's ids in
    the ids seen (sorted, each with the tick of its last read) and an insertion of the new ones,
    not a sort of everything remembered (13 ms per table per request at 170k ids, the old way).
    Ticks order the reads (ids of one request in the order given), so the rows kept are exactly
    the last `capacity` distinct ids read. Ids past those are dropped in batches, when the list
    reaches 1.25 x capacity."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._ids = np.empty(0, dtype=np.int64)  # (m,) sorted distinct ids seen
        self._ticks = np.empty(0, dtype=np.int64)  # (m,) distinct: the tick of each one's last read
        self._tick = 0

    def record(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        ticks = self._tick + np.arange(len(ids), dtype=np.int64)
        self._tick += len(ids)
        seen = contains(self._ids, ids)
        if seen.any():
            self._ticks[np.searchsorted(self._ids, ids[seen])] = ticks[seen]
        new, new_ticks = ids[~seen], ticks[~seen]
        if len(new):
            order = np.argsort(new)
            at = np.searchsorted(self._ids, new[order])
            self._ids = np.insert(self._ids, at, new[order])
            self._ticks = np.insert(self._ticks, at, new_ticks[order])
        if len(self._ids) > self.capacity + self.capacity // 4 + 1024:
            self._ids, self._ticks = self._recent()

    def _recent(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, ticks) of the `capacity` most recently read ids, ids sorted."""
        if len(self._ids) <= self.capacity:
            return self._ids, self._ticks
        if not self.capacity:
            return self._ids[:0], self._ticks[:0]
        older = len(self._ids) - self.capacity  # ids past the newest `capacity`
        newest = np.sort(np.argpartition(self._ticks, older)[older:])
        return self._ids[newest], self._ticks[newest]

    def forget(self, ids: np.ndarray) -> None:
        if len(ids) and len(self._ids):
            recent, ticks = self._recent()  # first drop what is past the newest `capacity`: an
            kept = ~np.isin(recent, ids, assume_unique=True)  # older id must not move up
            self._ids, self._ticks = recent[kept], ticks[kept]

    def plan(self, resident: np.ndarray, max_moves: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        # Both sides are distinct ids: np.isin(assume_unique=True) is one merge sort, 0.25 ms at 30k
        # ids against 27k where deduplicating first took 4.7 (on the placer, holding the lock).
        recent, ticks = self._recent()
        missing = ~np.isin(recent, resident, assume_unique=True)  # (m,)
        admit = recent[missing][np.argsort(-ticks[missing])]  # most recent first
        if max_moves is not None:
            admit = admit[:max_moves]
        stale = resident[~np.isin(resident, recent, assume_unique=True)]  # resident, not among the recent
        excess = len(resident) + len(admit) - self.capacity
        return admit, stale[: max(excess, 0)]


POLICIES = {"engram": EngramPolicy, "lru": LRUPolicy, "lfu": LFUPolicy, "random": RandomPolicy}
# Policies whose memory is bounded by the tier's capacity, for placement under a DRAM budget.
BOUNDED_POLICIES = {"recent": RecentPolicy}
DEFAULT_POLICY = "engram"


def make_policy(name: str, capacity: int, **kw) -> Policy:
    """The policy called `name` (one of POLICIES) for a tier of `capacity` rows; `kw` go to its
    constructor (e.g. seed for "random", decay_period for "engram")."""
    known = {**POLICIES, **BOUNDED_POLICIES}
    if name not in known:
        raise ValueError(f"unknown placement policy {name!r}; known: {sorted(known)}")
    return known[name](capacity, **kw)
