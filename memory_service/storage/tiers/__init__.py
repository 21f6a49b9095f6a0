"""Storage tiers of a table's rows: one small base class (`Tier`, base.py) and a file per tier.

    dram.py    DramTier: the DRAM arena (numpy arrays), slots found by a vectorised hash index
    device.py  DeviceTier: the same arena with rows and state in torch tensors on a device (GPU);
               import it from memory_service.storage.tiers.device (torch is not imported for the others)
    disk.py    DiskTier: one LMDB database per table in the cold shard's DiskEnvironment on disk

An arena (DramTier or DeviceTier) is a store's upper tier; on a cold shard the disk tier under it
holds every written row (memory_service/storage/residency.py moves rows between the two).

Every record is a row, its optimizer state and the step it was last brought up to date; every
operation takes a batch of ids (see base.py).
"""
from memory_service.storage.tiers.base import RowRecords, Tier
from memory_service.storage.tiers.disk import DiskEnvironment, DiskTier
from memory_service.storage.tiers.dram import DramTier

__all__ = ["DiskEnvironment", "DiskTier", "RowRecords", "Tier", "DramTier"]
