"""Storage tiers of a table's rows: one small base class (`Tier`, base.py) and a file per tier.

    warm.py  DramTier: DRAM arenas (numpy), slots found by a vectorised hash index
    hot.py   DeviceTier: the same arena with rows and state in torch tensors on a device (GPU);
             import it from memory_service.storage.tiers.device (torch is not imported for the others)
    cold.py  DiskTier: one LMDB database per table in the cold shard's DiskEnvironment on disk

Every record is a row, its optimizer state and the step it was last brought up to date; every
operation takes a batch of ids (see base.py).
"""
from memory_service.storage.tiers.base import RowRecords, Tier
from memory_service.storage.tiers.disk import DiskEnvironment, DiskTier
from memory_service.storage.tiers.dram import SlotIndex, DramTier

__all__ = ["DiskEnvironment", "DiskTier", "RowRecords", "SlotIndex", "Tier", "DramTier"]
