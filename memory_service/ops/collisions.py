"""Hash-collision stats of an Engram table: how often a lookup lands in a slot (row) that two or
more distinct N-grams share, measured from the N-grams the trainer actually looks up.

Each lookup carries a 64-bit fingerprint of the N-gram tuple behind it (trainer/fingerprint.py).
Per table, each shard keeps two bounded structures:

* **Lookup registers**, one per touched slot: lookups, the first fingerprint seen and a flag
  "a second distinct fingerprint arrived". The client sends one (lookups, smallest fingerprint,
  mixed) triple per distinct id of a fetch, so the flag is exact whatever the order of batches
  and clients: `colliding lookups / lookups` is the exact share of lookups that land in a shared
  slot, for as long as every touched slot has a register (`max_tracked_slots`; ~50 bytes each).
  Beyond the bound, new slots get no register, `exact` turns False and the share comes from the
  sample below.
* **A slot sample**, chosen by a hash of the row id, so every N-gram that lands in a sampled slot
  is seen, from the slot's first lookup on: each sampled slot keeps its set of fingerprints. It
  gives the distribution of distinct N-grams per touched slot (mean, and max over sampled slots),
  the number of distinct N-grams n (hence the birthday-bound occupancy 1 - e^(-n/m)), and the
  collision share when the registers are not exact. When the sample outgrows `max_sampled_slots`
  its rate halves: the slots kept are a consistent sub-sample (hash below the new threshold).

Why registers and not only the sample: lookups follow a Zipf law (on the stdlib corpus's
validation split the most frequent bigram is 1.6% of all lookups), so a sample's lookup-weighted
share is decided by which heavy slots it happens to hold. On that split, for a 2M-row bigram table
whose true share is 1.9%, slot samples at rate 1/4 missed it by 9.8% (median over 32 sample hashes)
and up to 39.5%, and at rate 1/2 still by up to 21.5%, while their distinct-N-grams-per-slot mean,
which weighs slots equally, stayed within 0.2% (bench/bench_collisions.py, results in
bench/results/collisions.md).

The sample's membership is a pure function of the row id (`slot_hash`), shared by client and
shard, so a shard whose rate halved simply ignores pairs of slots it no longer samples.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.ids import SlotIndex, mix64  # the stores' vectorised row id -> arena slot map

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TWO_64 = 2**64
MAX_TRACKED_SLOTS = 1 << 20  # lookup registers per table per shard (~50 MiB at most)
MAX_SAMPLED_SLOTS = 1 << 16  # sampled slots per table per shard before the rate halves
MAX_NGRAMS_PER_SLOT = 256  # fingerprints kept per sampled slot; more mark it saturated


def slot_hash(ids: np.ndarray) -> np.ndarray:
    """Row ids (n,) int64 -> (n,) uint64 hashes deciding which slots are sampled."""
    return mix64(np.asarray(ids).astype(np.uint64) + _GOLDEN)


def sample_threshold(rate: float) -> int:
    """A slot is sampled iff slot_hash < threshold; threshold in [0, 2**64] (2**64: every slot)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"collision sample rate {rate} must be in [0, 1]")
    return min(_TWO_64, round(rate * _TWO_64))


def is_sampled(ids: np.ndarray, threshold: int) -> np.ndarray:
    """(n,) bool: which row ids (n,) fall in the sample of `threshold`."""
    if threshold >= _TWO_64:
        return np.ones(len(ids), dtype=bool)
    return slot_hash(ids) < np.uint64(threshold)


@dataclass(frozen=True, eq=False)  # eq on ndarray fields would be ambiguous
class NgramBatch:
    """The N-grams behind one request's lookups of one table, aligned with its ids (n,):
    `lookups`, `fingerprints` (the smallest) and `mixed` (>= 2 distinct N-grams) per id; and
    every distinct (id, fingerprint) pair of sampled ids: `pair_index` into the ids, the
    fingerprint and its lookups."""

    lookups: np.ndarray  # (n,) int64 >= 1
    fingerprints: np.ndarray  # (n,) uint64
    mixed: np.ndarray  # (n,) bool
    pair_index: np.ndarray  # (p,) int64 in [0, n)
    pair_fingerprints: np.ndarray  # (p,) uint64
    pair_lookups: np.ndarray  # (p,) int64 >= 1

    @classmethod
    def checked(cls, num_ids: int, lookups, fingerprints, mixed, pair_index, pair_fingerprints,
                pair_lookups, table: str) -> "NgramBatch":
        """A batch from decoded arrays, or InvalidArgument naming the table, the bad value and
        its bound."""
        where = f"table {table!r}: ngrams"
        for name, arr in (("lookups", lookups), ("fingerprints", fingerprints), ("mixed", mixed)):
            if len(arr) != num_ids:
                raise InvalidArgument(f"{where}.{name} has {len(arr)} entries, expected one per id "
                                      f"({num_ids})")
        if not len(pair_index) == len(pair_fingerprints) == len(pair_lookups):
            raise InvalidArgument(f"{where}: pair_index, pair_fingerprints and pair_lookups have "
                                  f"{len(pair_index)}, {len(pair_fingerprints)} and "
                                  f"{len(pair_lookups)} entries; they must match")
        if len(lookups) and lookups.min() < 1:
            raise InvalidArgument(f"{where}.lookups {lookups.min()} must be >= 1")
        if len(pair_lookups) and pair_lookups.min() < 1:
            raise InvalidArgument(f"{where}.pair_lookups {pair_lookups.min()} must be >= 1")
        if len(pair_index) and pair_index.max() >= num_ids:
            raise InvalidArgument(f"{where}.pair_index {pair_index.max()} out of range "
                                  f"[0, {num_ids})")
        if mixed.max(initial=0) > 1:
            raise InvalidArgument(f"{where}.mixed {mixed.max()} must be 0 or 1")
        return cls(lookups.astype(np.int64), fingerprints.astype(np.uint64), mixed.astype(bool),
                   pair_index.astype(np.int64), pair_fingerprints.astype(np.uint64),
                   pair_lookups.astype(np.int64))

    def slice(self, start: int, stop: int) -> "NgramBatch":
        """The part for ids [start, stop), pair indices rebased to `start`. Needs the pairs sorted
        by index (as `summarize` returns them)."""
        lo, hi = np.searchsorted(self.pair_index, [start, stop])
        return NgramBatch(self.lookups[start:stop], self.fingerprints[start:stop],
                          self.mixed[start:stop], self.pair_index[lo:hi] - start,
                          self.pair_fingerprints[lo:hi], self.pair_lookups[lo:hi])

    def take(self, positions: np.ndarray) -> "NgramBatch":
        """The part for ids at `positions` (distinct, any order), in that order."""
        remap = np.full(len(self.lookups), -1, np.int64)
        remap[positions] = np.arange(len(positions))
        new_index = remap[self.pair_index]
        keep = new_index >= 0
        order = np.argsort(new_index[keep], kind="stable")  # pairs sorted by index, as slice needs
        return NgramBatch(self.lookups[positions], self.fingerprints[positions], self.mixed[positions],
                          new_index[keep][order], self.pair_fingerprints[keep][order],
                          self.pair_lookups[keep][order])


def summarize(distinct_ids: np.ndarray, positions: np.ndarray, fingerprints: np.ndarray,
              threshold: int) -> NgramBatch:
    """Client side: lookups -> one NgramBatch over the distinct ids.

    distinct_ids (u,) int64: the batch's distinct row ids; positions (m,): each lookup's index in
    `distinct_ids` (every index appears); fingerprints (m,) uint64: each lookup's N-gram."""
    fingerprints = np.asarray(fingerprints, dtype=np.uint64).reshape(-1)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if fingerprints.shape != positions.shape:
        raise InvalidArgument(f"{len(fingerprints)} fingerprints for {len(positions)} lookups: "
                              f"give one per row id")
    order = np.lexsort((fingerprints, positions))  # by position, then fingerprint
    pos, fps = positions[order], fingerprints[order]  # (m,) each
    new_pos = np.r_[True, pos[1:] != pos[:-1]]
    first = np.flatnonzero(new_pos)  # (u,) first lookup of each position
    last = np.r_[first[1:], len(pos)] - 1
    run_start = np.flatnonzero(new_pos | np.r_[True, fps[1:] != fps[:-1]])  # (p,) distinct pairs
    run_len = np.diff(np.r_[run_start, len(pos)])
    keep = is_sampled(distinct_ids[pos[run_start]], threshold)
    return NgramBatch(lookups=np.diff(np.r_[first, len(pos)]), fingerprints=fps[first],
                      mixed=fps[first] != fps[last], pair_index=pos[run_start][keep],
                      pair_fingerprints=fps[run_start][keep], pair_lookups=run_len[keep])


@dataclass(frozen=True)
class CollisionCounts:
    """One table's collision counts on one shard (the Stats rpc's CollisionStats)."""

    sample_rate: float
    tracked_slots: int
    exact: bool
    lookups: int
    colliding_lookups: int
    sampled_slots_touched: int
    sampled_distinct_ngrams: int
    sampled_max_distinct: int
    sampled_lookups: int
    sampled_colliding_lookups: int
    saturated_slots: int


class _SampledSlot:
    __slots__ = ("lookups", "fingerprints", "saturated")

    def __init__(self) -> None:
        self.lookups = 0
        self.fingerprints: set[int] = set()
        self.saturated = False


@dataclass
class _SampleTotals:
    """Sums over the sampled slots."""

    lookups: int = 0
    colliding: int = 0  # lookups of slots holding >= 2 distinct N-grams
    distinct: int = 0
    max_distinct: int = 0
    saturated: int = 0

    @classmethod
    def of(cls, slots) -> "_SampleTotals":
        totals = cls()
        for e in slots:
            d = len(e.fingerprints)
            totals.lookups += e.lookups
            totals.colliding += e.lookups if d >= 2 else 0
            totals.distinct += d
            totals.max_distinct = max(totals.max_distinct, d)
            totals.saturated += e.saturated
        return totals


class CollisionSketch:
    """Lookup registers and a slot sample of one table on one shard (see the module docstring).
    Thread-safe: fetches record from gRPC's thread pool."""

    def __init__(self, sample_rate: float, max_tracked_slots: int = MAX_TRACKED_SLOTS,
                 max_sampled_slots: int = MAX_SAMPLED_SLOTS,
                 max_ngrams_per_slot: int = MAX_NGRAMS_PER_SLOT) -> None:
        for name, value, least in (("max_tracked_slots", max_tracked_slots, 1),
                                   ("max_sampled_slots", max_sampled_slots, 1),
                                   ("max_ngrams_per_slot", max_ngrams_per_slot, 2)):
            if value < least:
                raise ValueError(f"{name} {value} must be >= {least}")
        self.threshold = sample_threshold(sample_rate)
        self.max_tracked_slots = max_tracked_slots
        self.max_sampled_slots = max_sampled_slots
        self.max_ngrams_per_slot = max_ngrams_per_slot
        self._index = SlotIndex()
        self._first = np.empty(0, dtype=np.uint64)  # (cap,) first fingerprint of each register
        self._lookups = np.empty(0, dtype=np.int64)  # (cap,)
        self._mixed = np.empty(0, dtype=bool)  # (cap,) >= 2 distinct N-grams seen
        self._exact = True
        self._sampled: dict[int, _SampledSlot] = {}
        # The sample's totals, kept as it grows so that `counts` (every Stats call and scrape) does
        # not walk up to max_sampled_slots Python objects; recounted when the rate halves.
        self._totals = _SampleTotals()
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> float:
        return self.threshold / _TWO_64

    def record(self, ids: np.ndarray, batch: NgramBatch) -> None:
        """Adds one request's lookups: distinct row ids (n,) int64 and their N-grams."""
        with self._lock:
            self._update_registers(ids, batch)
            self._update_sample(ids[batch.pair_index], batch.pair_fingerprints, batch.pair_lookups)

    def _update_registers(self, ids: np.ndarray, batch: NgramBatch) -> None:
        slots = self._index.lookup(ids)  # (n,)
        known = slots >= 0
        s = slots[known]  # distinct: ids are
        self._mixed[s] |= batch.mixed[known] | (self._first[s] != batch.fingerprints[known])
        self._lookups[s] += batch.lookups[known]
        new = np.flatnonzero(~known)
        room = self.max_tracked_slots - self._index.size
        if len(new) > room:
            new, self._exact = new[:room], False
        if not len(new):
            return
        first, size = self._index.size, self._index.size + len(new)
        if size > len(self._first):
            self._reserve(min(self.max_tracked_slots, max(size, 2 * len(self._first), 1024)))
        self._first[first:size] = batch.fingerprints[new]
        self._lookups[first:size] = batch.lookups[new]
        self._mixed[first:size] = batch.mixed[new]
        self._index.insert(ids[new], np.arange(first, size, dtype=np.int64))

    def _reserve(self, capacity: int) -> None:
        used = self._index.size
        for name in ("_first", "_lookups", "_mixed"):
            old = getattr(self, name)
            new = np.empty(capacity, dtype=old.dtype)
            new[:used] = old[:used]
            setattr(self, name, new)

    def _update_sample(self, ids: np.ndarray, fingerprints: np.ndarray, lookups: np.ndarray) -> None:
        keep = is_sampled(ids, self.threshold)  # the client may sample at a rate we halved
        totals = self._totals
        for slot, fp, n in zip(ids[keep].tolist(), fingerprints[keep].tolist(), lookups[keep].tolist()):
            entry = self._sampled.get(slot)
            if entry is None:
                entry = self._sampled[slot] = _SampledSlot()
            before = len(entry.fingerprints)
            entry.lookups += n
            if fp not in entry.fingerprints:
                if before < self.max_ngrams_per_slot:
                    entry.fingerprints.add(fp)
                elif not entry.saturated:
                    entry.saturated = True
                    totals.saturated += 1
            after = len(entry.fingerprints)
            totals.lookups += n
            totals.distinct += after - before
            totals.max_distinct = max(totals.max_distinct, after)
            if after >= 2:  # a slot turning shared brings the lookups it had so far
                totals.colliding += n if before >= 2 else entry.lookups
        while len(self._sampled) > self.max_sampled_slots:
            self._halve_sample()

    def _halve_sample(self) -> None:
        """Halve the rate: keep the slots whose hash is below half the threshold."""
        self.threshold //= 2
        slots = np.fromiter(self._sampled, dtype=np.int64, count=len(self._sampled))
        for slot in slots[~is_sampled(slots, self.threshold)].tolist():
            del self._sampled[slot]
        self._totals = _SampleTotals.of(self._sampled.values())

    def counts(self) -> CollisionCounts:
        with self._lock:
            used = self._index.size
            lookups, mixed = self._lookups[:used], self._mixed[:used]
            t = self._totals
            return CollisionCounts(
                sample_rate=self.sample_rate, tracked_slots=used, exact=self._exact,
                lookups=int(lookups.sum()), colliding_lookups=int(lookups[mixed].sum()),
                sampled_slots_touched=len(self._sampled), sampled_distinct_ngrams=t.distinct,
                sampled_max_distinct=t.max_distinct, sampled_lookups=t.lookups,
                sampled_colliding_lookups=t.colliding, saturated_slots=t.saturated)


@dataclass(frozen=True)
class CollisionSummary:
    """One table's collision stats over all shards: what `engram stats` shows.

    `collision_share`: share of lookups landing in a slot that holds >= 2 distinct N-grams (exact
    while `exact`, else estimated from the sample, as `sampled_collision_share` always is);
    `mean_distinct`: distinct N-grams per touched slot; `max_distinct`: the most in one sampled
    slot; `occupancy`: touched slots / table rows; `birthday_occupancy`: 1 - e^(-n/m), what a
    uniform hash of the same n distinct N-grams into m slots would occupy."""

    collision_share: float | None
    sampled_collision_share: float | None
    exact: bool
    mean_distinct: float | None
    max_distinct: int
    occupancy: float
    birthday_occupancy: float
    distinct_ngrams: float  # n, estimated from the sample
    lookups: int  # over tracked slots
    sample_rate: float  # the smallest rate over shards

    @classmethod
    def from_shards(cls, counts: list[CollisionCounts], num_rows: int) -> "CollisionSummary":
        """Combines shards: each shard's sampled counts are scaled by 1 / its rate (shards may
        have halved their rates differently)."""
        def scaled(field: str) -> float:
            return sum(getattr(c, field) / c.sample_rate for c in counts if c.sample_rate > 0)

        exact = all(c.exact for c in counts)
        lookups = sum(c.lookups for c in counts)
        sampled_lookups = scaled("sampled_lookups")
        sampled_share = scaled("sampled_colliding_lookups") / sampled_lookups if sampled_lookups else None
        share = (sum(c.colliding_lookups for c in counts) / lookups if lookups else None) if exact else sampled_share
        touched = scaled("sampled_slots_touched")
        distinct = scaled("sampled_distinct_ngrams")
        occupied = sum(c.tracked_slots for c in counts) if exact else touched
        return cls(collision_share=share, sampled_collision_share=sampled_share, exact=exact,
                   mean_distinct=distinct / touched if touched else None,
                   max_distinct=max((c.sampled_max_distinct for c in counts), default=0),
                   occupancy=occupied / num_rows, birthday_occupancy=1.0 - math.exp(-distinct / num_rows),
                   distinct_ngrams=distinct, lookups=lookups,
                   sample_rate=min((c.sample_rate for c in counts), default=0.0))
