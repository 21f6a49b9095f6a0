"""TableStores: the `TableStore` of each of a shard's tables, and the storage they keep rows in.

Three kinds of shard, by where their rows live:
- with `storage.path`, a DiskEnvironment (LMDB) in that directory holds every written row of every
  table and DRAM a bounded copy of some: each table's DRAM tier gets an equal share of
  `storage.dram_budget_bytes` (`_split_budget`), re-split whenever a table comes or goes;
- with `device` (a torch device name), a DeviceTier arena there holds each table's rows and
  optimizer state, so a hot shard on a GPU gathers the rows it serves in GPU memory;
- otherwise host DRAM (numpy) holds them, unbounded.
Reopening a directory reopens the tables it holds (`open_disk`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from memory_service.config import StorageConfig, TableConfig
from memory_service.errors import InvalidArgument, TableNotFound
from memory_service.placement import make_policy
from memory_service.storage.optimizer import optimizer_of
from memory_service.storage.store import TableStore, Update, state_width_of
from memory_service.storage.tiers.disk import DiskEnvironment, record_dtype
from memory_service.storage.tiers.dram import DramTier
from memory_service.storage.tiers.shared_arena import CATCHES_UP, HAS_DISK, SharedArena
from memory_service.tables import TableInfo, TablePush

# 1/HEADROOM of each table's DRAM share holds no rows: it is left to the placement policy's
# bookkeeping (plain LRU keeps 8 bytes per resident row, 1% of a share of 64-wide Adam rows; a
# frequency sketch needs more) and to what requests leave allocated between them (measured in
# tests/memory_service/shard/test_cold_memory.py: at rest, 2.6 MiB beyond a 240 MiB DRAM tier, LRU included).
HEADROOM = 16


STAGED = "\x00staged:"  # prefix of a table being built to replace another (no table name has it)


class TableStores(Mapping[str, TableStore]):
    """{table name: its TableStore} of shard `shard_id` of `num_shards`, read-only as a mapping:
    tables come with `add` and go with `remove`."""

    def __init__(self, shard_id: int, num_shards: int, storage: StorageConfig, device: str | None,
                 shared: SharedArena | None = None) -> None:
        self.shard_id, self.num_shards, self.storage, self.device = shard_id, num_shards, storage, device
        self.disk: DiskEnvironment | None = None  # with storage.path, once open_disk ran
        self.shared = shared  # host DRAM arenas in shared memory, for same-host readers
        self._stores: dict[str, TableStore] = {}

    def __getitem__(self, name: str) -> TableStore:
        return self._stores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stores)

    def __len__(self) -> int:
        return len(self._stores)

    def store(self, name: str) -> TableStore:
        """Table `name`'s store, or TableNotFound."""
        if name not in self._stores:
            raise TableNotFound(f"table {name!r} not found on shard {self.shard_id}")
        return self._stores[name]

    def info(self, name: str) -> TableInfo:
        """Table `name`'s config, step and size here (TableNotFound if absent)."""
        store = self.store(name)
        return TableInfo(store.cfg, store.step, store.num_materialized, store.nbytes, store.optimizer_rows)

    def reached(self, names: Iterable[str], step: int) -> bool:
        """Whether every table of `names` still here completed step `step`."""
        return all(name not in self._stores or self._stores[name].committed >= step for name in names)

    def read(self, requests: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of each table's checked ids (n,) -> (n, width) float32, in the ids' order."""
        return TableStore.read_many({name: (self._stores[name], ids) for name, ids in requests.items()})

    def prepare(self, pushes: dict[str, TablePush]) -> dict[str, Update]:
        """Each table's checked push computed, not stored (TableStore.prepare_update): InvalidArgument
        naming the table and row if one would leave a value non-finite, before any table changed."""
        updates = {}
        for name, push in pushes.items():
            try:
                updates[name] = self._stores[name].prepare_update(push.ids, push.grads, push.step, push.lr)
            except ValueError as err:
                raise InvalidArgument(f"table {name!r}: {err}") from None
        return updates

    def apply(self, updates: dict[str, Update], commit: bool) -> int:
        """Stores each table's prepared update, and with `commit` completes its step; returns the
        number of distinct rows updated."""
        num_updated = 0
        for name, update in updates.items():
            store = self._stores[name]
            store.write_update(update, commit)  # logs the step, then writes the rows
            num_updated += 0 if update.batch is None else len(update.batch.ids)
            if commit:
                store.commit(update.step, update.lr)
        return num_updated

    def digest(self) -> str:
        """sha256 over every table's digest, in name order: equal iff no state changed."""
        h = hashlib.sha256()
        for name in sorted(self._stores):
            h.update(self._stores[name].digest().encode())
        return h.hexdigest()

    def open_disk(self) -> None:
        """Opens the LMDB directory `storage.path` and the tables it holds (InvalidArgument if it
        belongs to another shard)."""
        make_policy(self.storage.policy, 0)  # an unknown policy name fails here, not in a thread
        self.disk = DiskEnvironment(self.storage.path, self.storage.map_bytes)
        try:
            self.disk.check_shard(self.shard_id, self.num_shards)
        except ValueError as err:
            self.disk.close()
            raise InvalidArgument(str(err)) from None
        for name, meta in self.disk.tables().items():
            if name.startswith(STAGED):  # a freeze that did not finish: its table stands as it was
                self.disk.drop_table(name)
                continue
            cfg = TableConfig.from_dict(meta["config"])
            self._stores[cfg.name] = self._new_store(cfg)
        self._split_budget()

    def add(self, cfg: TableConfig) -> TableStore:
        """A new, empty store of table `cfg` (its LMDB database created, with a disk)."""
        store = self._stores[cfg.name] = self._new_store(cfg)
        self._split_budget()
        return store

    def remove(self, name: str) -> None:
        """Retires table `name`'s store and deletes its rows (dirty ones are not written back)."""
        self._stores[name].close(flush=False)
        del self._stores[name]
        if self.shared is not None:
            self.shared.drop(name)
        if self.disk is not None:
            self.disk.drop_table(name)
            self._split_budget()

    def stage(self, cfg: TableConfig) -> TableStore:
        """A store for table `cfg` that will replace the table of that name (`replace`), its rows
        written straight to LMDB under a staging entry (no DRAM, no shared memory): until the
        swap the old table stands whole, and a reopened shard drops the staged one."""
        self.disk.drop_table(STAGED + cfg.name)  # what a failed freeze may have left
        state_width = state_width_of(cfg)
        disk = self.disk.open_table(STAGED + cfg.name, {"config": cfg.to_dict()}, cfg.stored_width, state_width)
        return TableStore(cfg, arena=DramTier(cfg.stored_width, state_width, max_rows=0), disk=disk,
                          policy=make_policy(self.storage.policy, 0))

    def replace(self, staged: TableStore) -> TableStore:
        """Swaps table `staged.cfg.name` for the staged store's rows in one LMDB transaction, and
        returns its store, opened afresh from them."""
        name = staged.cfg.name
        staged.close(flush=False)  # nothing in DRAM: every row went to LMDB
        self._stores.pop(name).close(flush=False)
        if self.shared is not None:
            self.shared.drop(name)
        self.disk.replace_table(name, STAGED + name)
        store = self._stores[name] = self._new_store(staged.cfg)
        self._split_budget()
        return store

    def flush(self, names: Iterable[str] | None = None) -> None:
        """Writes every table's (or the tables `names`') dirty DRAM rows to LMDB."""
        for store in self._stores.values() if names is None else (self._stores[n] for n in names):
            store.flush()

    def dirty(self) -> list[tuple[TableStore, np.ndarray]]:
        """(store, the ids of its dirty DRAM rows) of every table with some."""
        found = [(store, store.dirty_ids()) for store in self._stores.values()]
        return [(store, ids) for store, ids in found if len(ids)]

    def close(self) -> None:
        """Retires every store (writing dirty rows back) and closes the LMDB files."""
        for store in self._stores.values():
            store.close()
        if self.disk is not None:
            self.disk.close()
            self.disk = None

    def _new_store(self, cfg: TableConfig) -> TableStore:
        if self.disk is None and self.device is not None:
            from memory_service.storage.tiers.device import DeviceTier  # torch only where a shard asks for a device

            return TableStore(cfg, arena=DeviceTier(cfg.stored_width, state_width_of(cfg), device=self.device))
        if self.disk is None:
            return TableStore(cfg, arena=DramTier(cfg.stored_width, state_width_of(cfg),
                                                  shared=self._shared_table(cfg)))
        state_width = state_width_of(cfg)
        rows_here = -(-cfg.num_rows // self.num_shards)
        self.disk.reserve(min(rows_here * record_dtype(cfg.stored_width, state_width).itemsize * 3 // 2,
                              self.storage.map_bytes))
        disk = self.disk.open_table(cfg.name, {"config": cfg.to_dict()}, cfg.stored_width, state_width)
        # _split_budget sizes it
        dram = DramTier(cfg.stored_width, state_width, max_rows=0, shared=self._shared_table(cfg))
        return TableStore(cfg, arena=dram, disk=disk, policy=make_policy(self.storage.policy, 0))

    def _shared_table(self, cfg: TableConfig):
        """Table `cfg`'s shared-memory files, or None where the shard shares none."""
        if self.shared is None or cfg.is_quantized:  # packed rows: clients Fetch them (direct_reads.py)
            return None
        flags = (CATCHES_UP if optimizer_of(cfg).catches_up else 0) | (HAS_DISK if self.disk else 0)
        return self.shared.table(cfg.name, cfg.width, flags)

    def _split_budget(self) -> None:
        """Gives each table an equal share of the DRAM budget, as rows of its own size, less the
        headroom (see HEADROOM)."""
        if self.disk is None or not self._stores:
            return
        share = self.storage.dram_budget_bytes // len(self._stores)
        share -= share // HEADROOM
        for store in self._stores.values():
            store.set_arena_capacity(DramTier.rows_within(share, store.cfg.stored_width, store.state_width))
