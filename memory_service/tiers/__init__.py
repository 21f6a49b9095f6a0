"""Storage tiers of a table's rows: one small base class (`Tier`, base.py) and a file per tier.

    warm.py  WarmTier: DRAM arenas (numpy), slots found by a vectorised hash index
    hot.py   HotTier: the same arena with rows and state in torch tensors on a device (GPU);
             import it from memory_service.tiers.hot (torch is not imported for the others)
    cold.py  ColdTier: one LMDB database per table in the cold shard's ColdEnvironment on disk

Every record is a row, its optimizer state and the step it was last brought up to date; every
operation takes a batch of ids (see base.py).
"""
from memory_service.tiers.base import RowRecords, Tier
from memory_service.tiers.cold import ColdEnvironment, ColdTier
from memory_service.tiers.warm import SlotIndex, WarmTier

__all__ = ["ColdEnvironment", "ColdTier", "RowRecords", "SlotIndex", "Tier", "WarmTier"]
