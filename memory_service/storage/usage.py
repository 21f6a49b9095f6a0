"""What one storage tier of one shard holds of a table and what it served (`TierUsage`), the
running counts a store keeps per tier to fill it in (`TierCounters`), and the names reports give
the tiers. The store fills it in; the shard's reports (memory_service/ops/) add it up, so the
storage floor never imports the reporting one.
"""
from __future__ import annotations

from dataclasses import dataclass


DRAM_TIER = "dram"  # rows in host DRAM arenas (the only tier of an all-DRAM shard)
DEVICE_TIER = "device"  # rows in torch tensors on a device (a hot shard given a GPU)
DISK_TIER = "disk"  # rows in a cold shard's LMDB files on local disk


@dataclass
class TierCounters:
    """Since the store was opened: ids read that a tier held (hits) or not (misses, looked for
    below), and rows moved into (promotions) and out of (demotions) the tier."""

    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    writebacks: int = 0  # dirty rows written to the tier below when demoted or flushed


@dataclass(frozen=True)
class TierUsage:
    """The rows of one table in one storage tier of one shard, the reads it served and the rows
    placement moved. A shard's tiers are inclusive: the disk tier holds every written row, the
    arena above it copies of some (`dirty_rows` of those copies are newer than the disk ones)."""

    tier: str
    rows: int
    bytes: int
    hits: int  # ids read that the tier held
    misses: int = 0  # ids read that it did not hold (looked for in the tier below, or computed)
    promotions: int = 0  # rows placement moved into the tier
    demotions: int = 0  # rows placement moved out of it
    dirty_rows: int = 0  # rows held that are newer than the tier below's copy

    def __add__(self, other: "TierUsage") -> "TierUsage":
        """The sum of two shards' usage of one tier."""
        return TierUsage(self.tier, *(getattr(self, f) + getattr(other, f) for f in _COUNTS))


_COUNTS = ("rows", "bytes", "hits", "misses", "promotions", "demotions", "dirty_rows")
