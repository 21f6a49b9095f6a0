"""Replaying a table's reads through a placement policy, and Belady's optimum on the same reads.

A trace is the list of requests one table serves, each the distinct row ids it reads (batches).
Both replays share the service's semantics: a request's hits are the ids resident in the tier when
it arrives; between requests the tier changes by one plan, admitting only rows that request read
(on demand, see memory_service/placement/policy.py) and evicting any; hits are counted after
`warmup_batches` requests, which only fill the tier.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memory_service.ids import contains, sorted_unique
from memory_service.placement.policy import Policy


def num_reads(batches: Sequence[np.ndarray], warmup_batches: int) -> int:
    """Reads the replay counts: ids of the requests after the warm-up."""
    return int(sum(len(b) for b in batches[warmup_batches:]))


def simulate(policy: Policy, batches: Sequence[np.ndarray], warmup_batches: int, lookahead: int = 1,
             max_moves: int | None = None) -> float:
    """Hit rate (0..1) of `policy` on requests `batches` (each (n,) distinct int64 ids) after
    `warmup_batches`: per request t, hits = ids resident; `record(batch t)`; `expect` of each
    request up to t + `lookahead` not announced yet, in order (1, or True: the next step's fetch,
    which the service sees before it needs it; 0 or False: none); then the plan is checked against
    the interface's contract and applied."""
    _check_warmup(batches, warmup_batches)
    if lookahead < 0:
        raise ValueError(f"lookahead {lookahead} must be >= 0 (requests announced ahead)")
    resident = np.zeros(0, np.int64)  # sorted
    hits, announced = 0, 0  # announced: requests 1 .. announced were passed to expect
    for t, batch in enumerate(batches):
        if t >= warmup_batches:
            hits += int(np.count_nonzero(contains(resident, batch)))
        policy.record(batch)
        for ahead in range(max(announced, t) + 1, min(t + lookahead, len(batches) - 1) + 1):
            policy.expect(batches[ahead], step=ahead)
            announced = ahead
        admit, evict = policy.plan(resident, max_moves)
        _check_plan(policy, resident, batch, admit, evict, max_moves)
        resident = np.sort(np.concatenate([resident[~contains(evict, resident)], admit]))
    return hits / max(1, num_reads(batches, warmup_batches))


def belady_hit_rate(batches: Sequence[np.ndarray], capacity: int, warmup_batches: int) -> float:
    """Hit rate (0..1) of Belady's offline MIN with the replay's semantics: after each request the
    tier keeps, among its rows and those the request just read, the `capacity` read again soonest
    (rows never read again, or next read during the warm-up where hits do not count, are dropped;
    MIN may decline to admit). A hit needs the row held from its previous read to this one, so the
    hits are a largest set of such intervals with at most `capacity` at any time, and keeping the
    soonest-ending ones is the classic optimal greedy: no policy with these semantics does better."""
    _check_warmup(batches, warmup_batches)
    if capacity < 0:
        raise ValueError(f"capacity {capacity} must be >= 0")
    num_batches = len(batches)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in batches])])  # (num_batches + 1,)
    ids = np.concatenate(batches) if num_batches else np.zeros(0, np.int64)  # (n,)
    next_read = _next_reads(ids, offsets)  # (n,) request index of each id's next read
    next_read[next_read < warmup_batches] = num_batches  # a hit there counts nothing
    resident, resident_next = np.zeros(0, np.int64), np.zeros(0, np.int64)  # sorted ids, their next read
    hits = 0
    for t in range(num_batches):
        batch, batch_next = ids[offsets[t]:offsets[t + 1]], next_read[offsets[t]:offsets[t + 1]]
        read_now = contains(resident, batch)
        if t >= warmup_batches:
            hits += int(np.count_nonzero(read_now))
        stay = ~contains(np.sort(batch[read_now]), resident)  # the rest get their new next read
        pool = np.concatenate([resident[stay], batch])
        pool_next = np.concatenate([resident_next[stay], batch_next])
        wanted = pool_next < num_batches
        pool, pool_next = pool[wanted], pool_next[wanted]
        if len(pool) > capacity:
            soonest = np.argpartition(pool_next, capacity)[:capacity] if capacity else np.zeros(0, np.int64)
            pool, pool_next = pool[soonest], pool_next[soonest]
        order = np.argsort(pool)
        resident, resident_next = pool[order], pool_next[order]
    return hits / max(1, num_reads(batches, warmup_batches))


def _next_reads(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For each read of ids (n,) in requests cut at `offsets`, the index of the next request that
    reads the same id, or the number of requests when none does."""
    num_batches = len(offsets) - 1
    when = np.repeat(np.arange(num_batches), np.diff(offsets))  # (n,) request of each read
    order = np.lexsort((when, ids))  # by id, then by time
    same_next = ids[order][1:] == ids[order][:-1]
    following = np.full(len(ids), num_batches, np.int64)
    following[order[:-1][same_next]] = when[order][1:][same_next]
    return following


def _check_warmup(batches: Sequence[np.ndarray], warmup_batches: int) -> None:
    if not 0 <= warmup_batches <= len(batches):
        raise ValueError(f"warmup_batches {warmup_batches} must be in [0, {len(batches)}] (the requests)")


def _check_plan(policy: Policy, resident: np.ndarray, batch: np.ndarray, admit: np.ndarray, evict: np.ndarray,
                max_moves: int | None) -> None:
    """The interface's contract, so that a policy breaking it cannot report a better hit rate."""
    name = type(policy).__name__
    if len(sorted_unique(admit)) != len(admit) or len(sorted_unique(evict)) != len(evict):
        raise RuntimeError(f"{name}.plan returned repeated ids")
    if contains(resident, admit).any() or not contains(resident, evict).all():
        raise RuntimeError(f"{name}.plan admitted resident rows or evicted absent ones")
    if not contains(np.sort(batch), admit).all():
        raise RuntimeError(f"{name}.plan admitted rows not read since its last plan (a prefetch)")
    if len(resident) - len(evict) + len(admit) > policy.capacity:
        raise RuntimeError(f"{name}.plan leaves {len(resident) - len(evict) + len(admit)} rows "
                           f"in a tier of {policy.capacity}")
    if max_moves is not None and len(admit) > max_moves:
        raise RuntimeError(f"{name}.plan admitted {len(admit)} rows, over max_moves {max_moves}")
