"""Migration: rows move between the cold shards and a hot shard as a placement policy decides.

Runs in the hot shard's process, on a background thread, never inside a request. Each round it
drains the reads every shard served and the look-aheads it was told (held fetches, announcements,
each with the step it is for), feeds them to one `Policy` per table (only ids whose hot home is
this shard: id % num_hot), asks it for a plan, and moves rows in batches with their optimizer
state:

- promote: the cold home exports the rows (removed there, answered "moved" from then on), the hot
  shard imports them; then they are hot.
- demote: the hot shard exports them (answered "moved"), their cold homes import them.

A row is in flight between the export and the import, and requests for it are refused with
RowsMoved until it lands, so no fetch sees a stale copy and no push is applied to one; the client
refreshes its hot map and re-sends (memory_service/client.py).

A cold shard that crashes and restarts mid-move loses no row in flight: calls to it are re-sent
while it is unavailable (memory_service/wire/retry.py); an import is idempotent, and an export carries
a request id, so a re-sent one returns the rows it already handed over. A hot shard with a disk
directory (`hot-NNNN`) is durable as a cold one is, and Ray restarts it: its migrator writes each
move it starts in that directory (move_intent.py) and, started again over it, finishes the move a
crash cut in half (`resume`) before it plans another. A hot shard without one (all-DRAM, or rows
on a GPU) is not durable: its rows die with its process.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from memory_service.wire import codec
from memory_service.placement import DEFAULT_POLICY, make_policy
from memory_service.server.move_intent import Move, MoveIntent
from memory_service.ids import sorted_unique
from memory_service.placement.policy import READ, Policy, tell
from memory_service.wire.retry import RECONNECT_OPTIONS, RetryPolicy
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.wire.security import ClientSecurity, open_channel
from memory_service.shard.shard import Shard

IDLE_PAUSE_S = 1.0  # the longest pause between rounds while no shard saw reads


@dataclass
class MigrationCounters:
    rounds: int = 0
    promoted: int = 0  # rows moved cold -> hot
    demoted: int = 0  # rows moved hot -> cold


class Migrator:
    """Places rows of every table between `cold_targets` (gRPC, cold shard order) and the local
    hot shard `hot` (hot shard `hot.shard_id` of `hot.num_shards`), `capacity` rows per table.

    Rounds start at most every `interval_s` and take at most `max_duty` of the wall clock: the
    pause after a round is at least its length x (1 - max_duty) / max_duty. Shards share their
    machine with the trainer (2 cores here), and planning over every row seen costs tens of ms a
    round; unbounded, the migrator took more of the hot shard's CPU than its requests did.
    `security`: how to reach secured cold shards (a write token: exports and imports are writes)."""

    def __init__(self, hot: Shard, cold_targets: list[str], capacity: int, policy: str = DEFAULT_POLICY,
                 interval_s: float = 0.05, max_moves: int = 4096, timeout: float = 30.0,
                 max_duty: float = 0.05, retry: RetryPolicy = RetryPolicy(),
                 security: ClientSecurity | None = None):
        if not 0 < max_duty <= 1:
            raise ValueError(f"max_duty {max_duty} must be in (0, 1]")
        self.hot, self.capacity, self.policy_name = hot, capacity, policy
        self.interval_s, self.max_moves, self.timeout = interval_s, max_moves, timeout
        self.max_duty = max_duty
        self.retry = retry
        self.client_id = f"migrator-{uuid.uuid4().hex}"
        self._request_seqs = itertools.count(1)  # ExportRowsRequest.request_seq
        self.channels = [open_channel(t, (*codec.MESSAGE_OPTIONS, *RECONNECT_OPTIONS), security)
                         for t in cold_targets]
        self.cold = [memory_pb2_grpc.MemoryServiceStub(c) for c in self.channels]
        self.policies: dict[str, Policy] = {}
        self.counters = MigrationCounters()
        self._unfinished = True  # the last plan was cut at max_moves (or none ran yet)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # a durable hot shard: each move is written down before it starts, and finished after a crash
        path = hot.storage.path
        self.intent = MoveIntent(path, hot.storage.wal_fsync) if path is not None and hot.journal.durable else None
        self._resumed = self.intent is None

    def start(self) -> "Migrator":
        self._thread = threading.Thread(target=self._run, name="engram-migrator", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = False) -> int:
        """Ends the thread after the round in progress (idempotent). With `drain`, then moves
        every row this hot shard is home of back to its cold home, closes the channels and
        returns how many rows: a clean stop of the cluster (`engram stop`) keeps them there, in
        the cold shards' files, where the hot shard's would die with its process."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"hot shard {self.hot.shard_id}: the migration round did not end in "
                                   f"{self.timeout:g} s")
            self._thread = None
        if not drain:
            return 0
        try:
            return self._drain()
        finally:
            self.close()

    def close(self) -> None:
        """Closes the channels to the cold shards (after stop(); idempotent)."""
        for channel in self.channels:
            channel.close()
        self.channels = []

    def _drain(self) -> int:
        """Demote every row of every table this hot shard holds (in batches of `max_moves`)."""
        moved = 0
        with self.hot.moves.round() as free:
            if not free:
                raise RuntimeError(f"hot shard {self.hot.shard_id}: a checkpoint holds the moves; rows stay hot")
            for name in self.hot.list_tables():
                ids = np.asarray(self.hot.hot_map(name)[1], np.int64)
                for start in range(0, len(ids), self.max_moves):
                    self._demote(name, ids[start:start + self.max_moves])
                moved += len(ids)
        return moved

    def _run(self) -> None:
        pause = self.interval_s
        while not self._stop.wait(pause):
            start = time.perf_counter()
            busy = True
            try:
                busy = self.round()
            except Exception as err:  # keep serving; the next round retries, stats show the error
                self.error = err
            took = time.perf_counter() - start
            if busy:
                pause = max(self.interval_s, took * (1 - self.max_duty) / self.max_duty)
            else:  # nobody reads: look less and less often (each look is an rpc to every cold shard)
                pause = min(2 * pause, IDLE_PAUSE_S)

    def round(self) -> bool:
        """One round: drain the reads, plan, move; nothing while a checkpoint holds the shard's
        MoveGate (the reads wait for the next round: the shards keep them, bounded). Plans only
        when there were reads or the last plan was cut at `max_moves`: with neither, the plan
        cannot change, and planning over every row seen costs tens of ms. Returns False when it
        had nothing to do (the caller then looks less and less often)."""
        with self.hot.moves.round() as free:
            if not free:
                return True  # paused: look again soon
            if not self._resumed:
                self.resume()
            if not self._observe() and not self._unfinished:
                return False
            self._unfinished = False
            try:
                for name in self.hot.list_tables():
                    policy = self._policy(name)
                    admit, evict = policy.plan(self.hot.hot_map(name)[1], self.max_moves)
                    self._unfinished |= max(len(admit), len(evict)) >= self.max_moves
                    if len(evict):
                        self._demote(name, np.asarray(evict, np.int64))
                    if len(admit):
                        self._promote(name, np.asarray(admit, np.int64))
            except BaseException:  # a move may be cut in half: the next round finishes it first
                self._resumed = self.intent is None
                raise
            self.counters.rounds += 1
            return True

    def resume(self) -> int:
        """Finishes the move a crash of this hot shard interrupted (none: nothing), before any
        other: a promote re-sends its export (the cold shard answers with the rows it handed over
        then, or hands them over now) and imports what this shard does not hold yet; a demote takes
        the rows this shard let go of (its export remembered them) and imports them where they are
        not home yet. Returns the rows of the move."""
        move = self.intent.pending()
        if move is not None:
            ids = move.ids
            if move.table not in self.hot.list_tables():
                pass  # dropped since: its rows went with it
            elif move.kind == "promote":
                self._promote_part(move.table, ids, move.version, move.client_id, move.request_seq)
            else:
                records = self.hot.export_rows(move.table, ids, move.version, move.client_id, move.request_seq)
                held = self.hot.hot_map(move.table)[1]  # taken back after a failed import: they stay
                error = self._import_cold(move.table, ids[~np.isin(ids, held)],
                                          records.take(~np.isin(records.ids, held)), move.version)
                if error is not None:
                    self.intent.end()
                    raise error
            self.intent.end()
        self._resumed = True
        return 0 if move is None else len(move.ids)

    def _policy(self, name: str) -> Policy:
        if name not in self.policies:
            self.policies[name] = make_policy(self.policy_name, self.capacity)
        return self.policies[name]

    def _observe(self) -> bool:
        """Feed every shard's reads and look-aheads (this hot shard's rows only) to the tables'
        policies, each shard's in the order it saw them; returns whether there were any. A row
        has one home at a time, so its reads and announcements all come from one shard, in order;
        the parts of one step that several shards were told merge by the step they carry."""
        drained = [self.hot.drain_accesses()]
        for stub in self.cold:
            reply = self._rpc(stub, "DrainAccesses", memory_pb2.DrainAccessesRequest())
            drained.append({t.table: list(zip(codec.decode_ids(t.tags, t.table).tolist(),
                                              np.split(codec.decode_ids(t.ids, t.table),
                                                       np.cumsum(codec.decode_ids(t.lengths, t.table))[:-1])))
                            for t in reply.tables})
        seen = False
        for accesses in drained:
            for name, events in accesses.items():
                policy = self._policy(name)
                for tag, ids in events:
                    ids = ids[ids % self.hot.num_shards == self.hot.shard_id]
                    tell(policy, tag, ids if tag == READ else sorted_unique(ids))
                seen |= len(events) > 0
        return seen

    def _rpc(self, stub, rpc: str, request):
        """rpc `rpc` to a cold shard, re-sent while it is unavailable (it restarts after a crash)."""
        method = getattr(stub, rpc)
        return self.retry.call(lambda: method(request, timeout=self.timeout),
                               f"{rpc} to cold shard {self.cold.index(stub)}")

    def _promote(self, name: str, ids: np.ndarray) -> None:
        version = self.hot.homes.version + 1
        width, state_width = self.hot.describe_table(name).config.width, self.hot.state_width(name)
        n = len(self.cold)
        for c in range(n):
            part = ids[ids % n == c]
            if not len(part):
                continue
            seq = next(self._request_seqs)
            self._begin(Move("promote", name, part, version, self.client_id, seq))
            self._promote_part(name, part, version, self.client_id, seq)
            self._end()
            self.counters.promoted += len(part)

    def _promote_part(self, name: str, part: np.ndarray, version: int, client_id: str, seq: int) -> None:
        """Moves rows `part` (all of one cold home) here; export request (client_id, seq)."""
        c = int(part[0] % len(self.cold))
        width, state_width = self.hot.describe_table(name).config.width, self.hot.state_width(name)
        reply = self._rpc(self.cold[c], "ExportRows", memory_pb2.ExportRowsRequest(
            table=name, ids=codec.encode_ids(part), version=version, client_id=client_id, request_seq=seq))
        self.hot.import_rows(name, codec.records_from_proto(reply, width, state_width), version, part)

    def _begin(self, move: Move) -> None:
        if self.intent is not None:
            self.intent.begin(move)

    def _end(self) -> None:
        if self.intent is not None:
            self.intent.end()

    def _demote(self, name: str, ids: np.ndarray) -> None:
        version = self.hot.homes.version + 1
        seq = next(self._request_seqs)
        self._begin(Move("demote", name, ids, version, self.client_id, seq))
        records = self.hot.export_rows(name, ids, version, self.client_id, seq)  # remembered, for resume
        error = self._import_cold(name, ids, records, version)
        self._end()  # imported, or taken back here
        if error is not None:
            raise error

    def _import_cold(self, name: str, ids: np.ndarray, records, version: int) -> Exception | None:
        """Imports rows `ids` (`records` those written) that this shard exported into their cold
        homes; the rows of a cold shard that stayed down are taken back here (its error returned)."""
        n = len(self.cold)
        error = None
        for c in range(n):
            part = ids[ids % n == c]
            if not len(part):
                continue
            mine = records.take(records.ids % n == c)
            try:
                self._rpc(self.cold[c], "ImportRows", memory_pb2.ImportRowsRequest(
                    records=codec.records_to_proto(name, mine), version=version, ids=codec.encode_ids(part)))
                self.counters.demoted += len(part)
            except Exception as err:  # the cold shard stayed down: its rows stay hot rather than nowhere
                self.hot.import_rows(name, mine, version, part)
                error = err
        return error

