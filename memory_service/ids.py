"""Row ids: the checks and set operations every layer applies to them, the hash that mixes them,
and the vectorised row id -> slot index the DRAM arenas and the collision registers are built on.

The shared vocabulary of the service (the lowest floor): it imports nothing of the project, so the
client, the shards, the storage tiers, placement and the trainer can all use it.
"""
from __future__ import annotations

import numpy as np

from memory_service.native import kernels

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def check_ids(name: str, ids: np.ndarray) -> np.ndarray:
    """`ids` as a 1-D int64 array of non-negative row ids, or a ValueError naming `name`."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} holds a negative row id {ids.min()}; row ids are >= 0")
    return ids


def sorted_unique(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct ids (m,) of ids (n,). np.unique's hash path (numpy 2.x) is ~10x slower on
    int64 ids than a sort and a neighbour compare."""
    ids = np.sort(ids)
    return ids[np.r_[True, ids[1:] != ids[:-1]]] if ids.size else ids


def contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask (n,): which of ids (n,) are in sorted_ids (m,) (sorted, distinct); a binary search,
    where np.isin would first deduplicate both arrays."""
    if sorted_ids.size == 0:
        return np.zeros(len(ids), bool)
    at = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose output bits all depend on every input
    bit. x: uint64 array of any shape -> uint64 array of that shape (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))



_EMPTY = -1  # key of a never-used bucket (row ids are >= 0)
_TOMBSTONE = -2  # key of a bucket whose id was removed: lookups probe past it, inserts reuse it
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hash: spreads ids r = s mod N too
MIN_INDEX_BITS = 4


def new_buckets(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Private keys (all empty) and slots arrays of a SlotIndex of 2**bits buckets."""
    return np.full(1 << bits, _EMPTY, dtype=np.int64), np.zeros(1 << bits, dtype=np.int64)


def _bits_for(size: int) -> int:
    """Bucket bits that keep `size` ids at load <= 1/2."""
    return max(MIN_INDEX_BITS, (2 * size - 1).bit_length())


class SlotIndex:
    """row id -> arena slot, linear probing at load <= 1/2, all ids of a call probed together.
    Removal leaves tombstones, swept by rehashing when they would push the load past 1/2."""

    def __init__(self, min_size: int = 0, alloc=None) -> None:
        # alloc(bits) -> (keys, slots) of 2**bits buckets, keys -1: where the arrays live (a
        # shard's shared-memory arena, storage/tiers/shared_arena.py); None: private numpy arrays
        self._alloc = alloc if alloc is not None else new_buckets
        self._bits = _bits_for(min_size)
        self._keys, self._slots = self._alloc(self._bits)  # (buckets,) row ids, (buckets,) arena slots
        self.size = 0
        self._tombstones = 0

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._slots.nbytes

    @staticmethod
    def nbytes_for(size: int) -> int:
        """Bytes of an index sized for `size` ids (what it grows to at most while holding them)."""
        return 16 << _bits_for(size)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (ids.astype(np.uint64) * _FIBONACCI >> np.uint64(64 - self._bits)).astype(np.int64)

    def _find(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int64 -> (n,) buckets holding them, -1 where absent."""
        if kernels.active():
            return kernels.index_lookup(self._keys, self._slots, ids, self._bits, want_slots=False)
        out = np.full(ids.shape[0], -1, dtype=np.int64)
        pending, bucket = np.arange(ids.shape[0]), self._home(ids)  # (m,) each, shrinking
        mask = len(self._keys) - 1
        while pending.size:
            keys = self._keys[bucket]
            hit = keys == ids[pending]
            out[pending[hit]] = bucket[hit]
            probe_on = ~hit & (keys != _EMPTY)
            pending, bucket = pending[probe_on], (bucket[probe_on] + 1) & mask
        return out

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int64 -> (n,) int64 slots, -1 where the id has no slot."""
        if kernels.active():  # one probe loop per id, no passes over shrinking arrays
            return kernels.index_lookup(self._keys, self._slots, ids, self._bits, want_slots=True)
        buckets = self._find(ids)
        return np.where(buckets >= 0, self._slots[buckets], -1)

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Adds distinct ids, none present yet. ids, slots: (n,) int64."""
        used = self.size + self._tombstones + len(ids)
        if 2 * used > len(self._keys):
            # Sweep tombstones at the same size when that is enough, else grow.
            need = self.size + len(ids)
            self._rehash(self._bits if 2 * need <= len(self._keys) else max(self._bits + 1, _bits_for(need)))
        pending, bucket = np.arange(len(ids)), self._home(ids)
        mask = len(self._keys) - 1
        while pending.size:
            free = self._keys[bucket] < 0  # never used or a tombstone (ids are absent: reuse is safe)
            # Pending ids may reach the same free bucket: the first takes it, the rest probe on.
            _, first = np.unique(bucket[free], return_index=True)
            won, won_bucket = pending[free][first], bucket[free][first]
            self._tombstones -= int(np.count_nonzero(self._keys[won_bucket] == _TOMBSTONE))
            self._keys[won_bucket], self._slots[won_bucket] = ids[won], slots[won]
            placed = np.zeros(len(ids), dtype=bool)
            placed[won] = True
            probe_on = ~placed[pending]
            pending, bucket = pending[probe_on], (bucket[probe_on] + 1) & mask
        self.size += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Removes distinct ids, all present. ids: (n,) int64."""
        buckets = self._find(ids)
        assert (buckets >= 0).all(), "removing ids the index does not hold"
        self._keys[buckets] = _TOMBSTONE
        self.size -= len(ids)
        self._tombstones += len(ids)

    def move(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Points present ids (n,) at new `slots` (n,)."""
        buckets = self._find(ids)
        assert (buckets >= 0).all(), "moving ids the index does not hold"
        self._slots[buckets] = slots

    def fit(self, max_size: int) -> None:
        """Rehashes to the size `max_size` ids need (down as well as up); size <= max_size."""
        assert self.size <= max_size
        self._rehash(_bits_for(max_size))

    def _rehash(self, bits: int) -> None:
        live = self._keys >= 0
        ids, slots = self._keys[live], self._slots[live]
        self._bits = bits
        self._keys, self._slots = self._alloc(bits)
        self.size = self._tombstones = 0
        self.insert(ids, slots)
