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

The policies, one file per family, are listed with `make_policy` in memory_service/placement/__init__.py;
this module holds their base class, the tags of the events queued for them and the plan they share
(`plan_by_keys`: rank the resident rows and the rows just read, keep the best).
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
