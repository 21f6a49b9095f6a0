"""DirectReads: a same-host client reading rows straight from its shards' shared-memory arenas.

A shard whose rows are in host DRAM keeps them, their last steps and its slot index in shared
memory (memory_service/storage/tiers/shared_arena.py) and versions them with its request lock. A
client on the same host asks the shard once where they are (the DirectReads rpc: a directory and
a nonce it must find there), maps the files read-only and gathers a request's rows with
memory_service/native/arena.c under the version check: the gather counts only if no request of
the shard ran meanwhile, so it sees the state between two requests, never part of a step. It
answers only when the whole request of that shard can be read so: every row is in the arena or
was never written (then, as the shard would, it computes the row from the table's seed: a row
not on disk and not moved), up to date (a dense-Adam table's rows at the committed step), no step
is half written, the table is at `min_step`. Otherwise the request goes
to the shard as a Fetch, which waits, catches up, reads the disk or refuses moved rows as before.
The ids read are reported to their shard in the background (Announce.direct_reads), at most
REPORT_SECONDS late, so its stats and placement see every read (`flush` before reading stats).
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from memory_service.config import TableConfig
from memory_service.native import compiled
from memory_service.rows import init_rows_many
from memory_service.rpc import memory_pb2
from memory_service.storage.tiers.shared_arena import FIELD, HEADER, table_key
from memory_service.wire import codec
from memory_service.wire.transport import Transport

log = logging.getLogger(__name__)

ATTEMPTS = 16  # gathers tried while the shard is busy before the request goes to it as a Fetch
REPORT_IDS = 1 << 16  # report a shard's direct reads once this many ids are pending...
REPORT_SECONDS = 0.05  # ...or at the first read this long after the previous one (a migration round: 50 ms)


def _map(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


class _TableFiles:
    """One table's mapped files, as of the generations its header named when they were mapped."""

    def __init__(self, base: str) -> None:
        self.hdr = _map(base + ".hdr")
        header = np.frombuffer(self.hdr, np.int64, len(HEADER))
        self.index_gen, self.rows_gen = int(header[FIELD["index_gen"]]), int(header[FIELD["rows_gen"]])
        self.homes_gen = int(header[FIELD["homes_gen"]])
        self.index = _map(f"{base}.index.{self.index_gen}")
        self.rows = _map(f"{base}.rows.{self.rows_gen}")
        self.homes = _map(f"{base}.homes.{self.homes_gen}")


class _ShardArena:
    """A shard's shared-memory directory, mapped: OSError if it is not on this host."""

    def __init__(self, path: str, nonce: bytes) -> None:
        with open(os.path.join(path, "nonce"), "rb") as f:
            if f.read() != nonce:
                raise OSError(f"{path} is another shard's (nonce differs): not this host's shard")
        self.path = path
        self.seq = _map(os.path.join(path, "shard"))
        self.pid = int(np.frombuffer(self.seq, np.int64, 2)[1])
        self.tables: dict[str, _TableFiles] = {}

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process of that pid: ours is gone
            return False

    def files(self, name: str, remap: bool = False) -> _TableFiles:
        if remap or name not in self.tables:
            self.tables[name] = _TableFiles(os.path.join(self.path, f"t-{table_key(name)}"))
        return self.tables[name]


@dataclass
class _TableReads:
    """One table's direct reads on one shard since the last report."""

    ids: list[np.ndarray] = field(default_factory=list)
    reads: int = 0  # fetches that named the table
    computed: int = 0  # ids the arena held no row for (never written: computed from the seed)


class DirectReads:
    """Direct reads of a client's shards (`transport`'s) that share its host."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._arenas: list[_ShardArena | None | bool] = [None] * transport.num_shards  # False: never
        self._pending: list[dict[str, _TableReads]] = [{} for _ in range(transport.num_shards)]
        self._pending_ids = [0] * transport.num_shards
        self._pending_fetches = [0] * transport.num_shards
        self._timer: threading.Timer | None = None  # sends what is pending when reads stop
        self._reported = [time.monotonic()] * transport.num_shards
        self._sent: list[Future] = []
        self._lock = threading.Lock()  # reads come from the caller's and the prefetcher's threads
        self.reads = self.fallbacks = 0  # requests answered here, and sent on as a Fetch

    @staticmethod
    def available() -> bool:
        return compiled.AVAILABLE

    def read(self, shard: int, items: list[tuple[TableConfig, np.ndarray, np.ndarray]], min_step: int) -> bool:
        """Fills each (table, ids (n,) int64, out (n, width) in the table's wire dtype: float32, or
        uint16 bf16 bits rounded as a shard rounds its replies) of one shard's request from its
        arena; False (out partly written, to be overwritten) where the request must go to the
        shard as a Fetch."""
        arena = self._arena(shard)
        if arena is None or any(cfg.is_quantized for cfg, _, _ in items):  # shards publish no packed rows
            return False
        wire = [out for _, _, out in items]
        items = [(cfg, ids, out if out.dtype == np.float32 else np.empty(out.shape, np.float32))
                 for cfg, ids, out in items]
        if not self._gather(arena, shard, items, min_step):
            return False
        for target, (_, _, rows) in zip(wire, items):
            if target is not rows:  # bf16 on the wire
                target[...] = codec.float32_to_bfloat16_bits(rows)
        return True

    def _gather(self, arena: _ShardArena, shard: int, items, min_step: int) -> bool:
        """`read` of float32 outputs."""
        remapped = False
        missing = [np.empty(len(ids) + 1, np.int64) for _, ids, _ in items]  # [m, positions...]
        for _ in range(ATTEMPTS):
            try:
                entries = [(f.hdr, f.index, f.index_gen, f.rows, f.rows_gen, f.homes, f.homes_gen, ids, out, gone)
                           for (cfg, ids, out), gone in zip(items, missing)
                           for f in (arena.files(cfg.name, remap=remapped),)]
            except (OSError, ValueError):  # a file replaced meanwhile, or the table is not there
                if remapped:
                    break
                remapped = True
                continue
            status = compiled._arena.gather(arena.seq, entries, min_step)
            if status == compiled._arena.OK:
                if not arena.alive():  # a dead shard's files never change: not its rows now
                    self._arenas[shard] = None
                    break
                self._fill_initial(items, missing)
                self._note(shard, items, missing)
                return True
            if status in (compiled._arena.NOT_YET, compiled._arena.FALLBACK):
                break
            if status == compiled._arena.REMAP:
                if remapped:  # the freshly mapped files are not current either: dropped, or out of memory
                    break
                remapped = True
                continue
            remapped = False
            time.sleep(0)  # the shard holds its lock: let it finish
        self.fallbacks += 1
        return False

    @staticmethod
    def _fill_initial(items, missing: list[np.ndarray]) -> None:
        """Computes the never-written rows the gather left out, as the shard would (one pass)."""
        todo = [(cfg, out, gone[1:1 + gone[0]]) for (cfg, ids, out), gone in zip(items, missing) if gone[0]]
        if not todo:
            return
        rows = init_rows_many([(cfg.seed, ids[at], cfg.width, cfg.init_scale)
                               for (cfg, ids, _), gone in zip(items, missing) if gone[0]
                               for at in (gone[1:1 + gone[0]],)])
        for (_, out, at), values in zip(todo, rows):
            out[at] = values

    def _arena(self, shard: int) -> _ShardArena | None:
        arena = self._arenas[shard]
        if arena is False:
            return None
        if arena is None:
            try:
                info = self.transport.call(shard, "DirectReads", memory_pb2.DirectReadsRequest())
            except Exception as err:  # an old shard, a refusal: this shard is read by Fetch
                log.debug("shard %d: no direct reads (%s)", shard, err)
                self._arenas[shard] = False
                return None
            try:
                arena = _ShardArena(info.path, info.nonce) if info.path else False
            except OSError:
                arena = False  # another host's shard
            self._arenas[shard] = arena
        return arena or None

    def _note(self, shard: int, items, missing: list[np.ndarray]) -> None:
        """Keeps the ids read (and how many were computed: `missing`'s counts) for the shard's
        next report, and sends it when due."""
        with self._lock:
            pending = self._pending[shard]
            for (cfg, ids, _), gone in zip(items, missing):
                table = pending.setdefault(cfg.name, _TableReads())
                table.ids.append(ids.copy())
                table.reads += 1
                table.computed += int(gone[0])
                self._pending_ids[shard] += len(ids)
            self._pending_fetches[shard] += 1
            self.reads += 1
            due = (self._pending_ids[shard] >= REPORT_IDS
                   or time.monotonic() - self._reported[shard] >= REPORT_SECONDS)
            if not due and self._timer is None:
                self._timer = threading.Timer(REPORT_SECONDS, self._report_late)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.report(shard)

    def _report_late(self) -> None:
        with self._lock:
            self._timer = None
        try:
            self.report()
        except Exception as err:  # the client closed meanwhile
            log.debug("direct reads not reported: %s", err)

    def report(self, shard: int | None = None) -> None:
        """Sends the pending direct reads of `shard` (None: every shard) as an Announce."""
        for k in range(self.transport.num_shards) if shard is None else (shard,):
            with self._lock:
                pending, self._pending[k], self._pending_ids[k] = self._pending[k], {}, 0
                fetches, self._pending_fetches[k] = self._pending_fetches[k], 0
                self._reported[k] = time.monotonic()
                self._sent = [f for f in self._sent if not self._done(f)]
            if pending:
                tables = list(pending.values())
                request = memory_pb2.AnnounceRequest(
                    direct_fetches=fetches,
                    direct_reads=[memory_pb2.TableIds(table=name, ids=codec.encode_ids(np.concatenate(t.ids)))
                                  for name, t in pending.items()],
                    direct_table_reads=np.array([t.reads for t in tables], "<u4").tobytes(),
                    direct_computed=np.array([t.computed for t in tables], "<u8").tobytes())
                future = self.transport.start(k, "Announce", request)
                with self._lock:
                    self._sent.append(future)

    @staticmethod
    def _done(future: Future) -> bool:
        if not future.done():
            return False
        if (err := future.exception()) is not None:
            log.warning("a report of direct reads was lost (%s): the shard's read counts are short", err)
        return True

    def flush(self, timeout: float = 5.0) -> None:
        """Sends what is pending and waits (up to `timeout` s) for the reports to arrive: the
        shards' stats count every read made so far."""
        self.report()
        with self._lock:
            sent, self._sent = self._sent, []
        for future in sent:
            try:
                future.result(timeout=timeout)
            except Exception as err:
                log.warning("a report of direct reads was lost (%s)", err)

    def close(self, timeout: float = 5.0) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush(timeout)
