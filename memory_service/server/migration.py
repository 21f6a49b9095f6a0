"""Migration: rows move between the cold shards and a hot shard as a placement policy decides.

Runs in the hot shard's process, on a background thread, never inside a request. Each round it
drains the reads every shard served and the look-aheads it was told (held fetches, announcements,
each with the step it is for), feeds them to one `Policy` per table (only ids whose hot home is
this shard: id % num_hot), asks it for a plan, and moves rows in batches with their optimizer
state:

- promote: the cold home exports the rows (removed there, answered "moved" from then on), the hot
  shard imports them; then they are hot.
- demote: the hot shard exports them (answered "moved"), their cold homes import them.

A refused import leaves the rows where they were: the exporting shard remembers what each export
handed over, and when the destination refuses it (rows the hot shard would not store: a
non-finite row or optimizer state, which only a checkpoint from before the push-side checks can
hold; or any other error), the exporting shard takes the rows back from its own copy (ReturnRows
for a cold shard, `Shard.return_rows` here), logged like an import. Rows are never held by
nobody: a return that fails is retried every round, and the rows answer RowsMoved until it lands.

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

import grpc
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
    returned: int = 0  # rows a cold shard exported and took back, this shard having refused them


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
        self._returns: list[_Return] = []  # exports not taken here whose return failed: retried each round
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
            self._retry_returns()
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
            self._retry_returns()
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
            elif move.kind in ("promote", "return"):
                c = int(ids[0] % len(self.cold))
                error = (self._promote_part(move.table, ids, move.version, move.client_id, move.request_seq)
                         if move.kind == "promote" else
                         self._give_back(_Return(c, move.table, ids, move.version, move.request_seq)))
                if error is not None:
                    raise error  # the intent stays: tried again next round
            else:
                records = self.hot.export_rows(move.table, ids, move.version, move.client_id, move.request_seq)
                held = self.hot.hot_map(move.table)[1]  # taken back after a failed import: they stay
                error = self._import_cold(move.table, ids[~np.isin(ids, held)],
                                          records.take(~np.isin(records.ids, held)), move.version, move.request_seq)
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
        """Moves rows `ids` of table `name` from their cold homes here, one cold shard's part at a
        time (`_promote_part`); raises the first error after trying every part."""
        version = self.hot.homes.version + 1
        n = len(self.cold)
        error = None
        for c in range(n):
            part = ids[ids % n == c]
            if not len(part):
                continue
            seq = next(self._request_seqs)
            self._begin(Move("promote", name, part, version, self.client_id, seq))
            if (failed := self._promote_part(name, part, version, self.client_id, seq)) is None:
                self._end()
            else:  # a durable hot shard keeps the intent and finishes (or gives back) the move first next round
                error = error or failed
                if self.intent is not None:
                    break
        if error is not None:
            raise error

    def _promote_part(self, name: str, part: np.ndarray, version: int, client_id: str, seq: int) -> Exception | None:
        """Moves rows `part` (all of one cold home) here; export request (client_id, seq). A cold
        shard lets go of its rows only once this shard took them: rows this shard refuses (not
        finite: only a checkpoint from before that check can bring such rows), or the whole part
        when the import fails for another reason, are given back (`_give_back`), after the intent
        says so (a crash then re-sends the return, never the export). Returns the error, if any."""
        c = int(part[0] % len(self.cold))
        cfg = self.hot.describe_table(name).config
        width, state_width = cfg.stored_width, self.hot.state_width(name)
        try:
            reply = self._rpc(self.cold[c], "ExportRows", memory_pb2.ExportRowsRequest(
                table=name, ids=codec.encode_ids(part), version=version, client_id=client_id, request_seq=seq))
        except Exception:  # it may have been applied, its answer lost: give back whatever it took
            if self.intent is None:  # a durable hot shard re-sends the export instead (resume)
                self._returns.append(_Return(c, name, part, version, seq))
            raise
        records = codec.records_from_proto(reply, width, state_width)
        finite = np.isfinite(records.rows).all(axis=1) & np.isfinite(records.state).all(axis=1)
        if cfg.is_quantized:  # packed codes, not numbers (memory_service/quantization.py)
            finite = np.ones(len(records), bool)
        refused, error = records.ids[~finite], None
        keep = np.setdiff1d(part, refused)
        try:
            if len(keep):
                self.hot.import_rows(name, records.take(finite), version, keep)
        except Exception as err:  # refused here: the rows go back to their cold home, not nowhere
            refused, error = part, err
        self.counters.promoted += len(part) - len(refused)
        if len(refused):
            self._begin(Move("return", name, refused, version, client_id, seq))
            error = self._give_back(_Return(c, name, refused, version, seq)) or error
        return error

    def _give_back(self, back: "_Return") -> Exception | None:
        """Has cold shard `back.cold` serve again the rows of its export `back.seq` that this
        shard did not take (ReturnRows: it re-imports them from its own copy of the export).
        Returns None, or the error when that shard stayed unavailable: the return is then tried
        again (a durable hot shard's intent keeps it, else it is kept in memory and retried at every
        round; the shard remembers the export across a restart, through its write-ahead log), and
        the rows are refused with RowsMoved meanwhile, never served stale. A shard that does not
        know the export (FAILED_PRECONDITION: it was never applied, and the rows have moved since)
        has nothing to give back: the return is done."""
        try:
            reply = self._rpc(self.cold[back.cold], "ReturnRows", memory_pb2.ReturnRowsRequest(
                table=back.table, ids=codec.encode_ids(back.ids), version=back.version,
                client_id=self.client_id, request_seq=back.seq))
        except Exception as err:
            if isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return None
            if self.intent is None:
                self._returns.append(back)
            return err
        self.counters.returned += reply.rows_returned
        return None

    def _retry_returns(self) -> None:
        """Gives back the rows of the returns that failed before (`_give_back`, or an export
        whose answer never came), oldest first. One that fails again is kept and its error shown
        (`error`); the round goes on: rows whose return is pending are away from their cold shard,
        which refuses to export them again until it took them back."""
        pending, self._returns = self._returns, []
        for back in pending:
            if (error := self._give_back(back)) is not None:
                self.error = error

    def _begin(self, move: Move) -> None:
        if self.intent is not None:
            self.intent.begin(move)

    def _end(self) -> None:
        if self.intent is not None:
            self.intent.end()

    def _demote(self, name: str, ids: np.ndarray) -> None:
        """Moves rows `ids` of table `name` from here to their cold homes; a part whose cold shard
        refuses it (or stays unavailable) is taken back here from this shard's copy of the export."""
        version = self.hot.homes.version + 1
        seq = next(self._request_seqs)
        self._begin(Move("demote", name, ids, version, self.client_id, seq))
        records = self.hot.export_rows(name, ids, version, self.client_id, seq)  # remembered, for resume
        error = self._import_cold(name, ids, records, version, seq)
        self._end()  # imported, or taken back here
        if error is not None:
            raise error

    def _import_cold(self, name: str, ids: np.ndarray, records, version: int, seq: int) -> Exception | None:
        """Imports rows `ids` (`records` those written) that this shard exported (export `seq`)
        into their cold homes; the rows a cold shard refused, or that stayed down, are taken back
        here from this shard's copy of the export (the error returned)."""
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
            except Exception as err:  # refused, or the cold shard stayed down: its rows stay hot rather than nowhere
                self.hot.return_rows(name, part, version, self.client_id, seq)
                error = err
        self.hot.forget_export(self.client_id, seq)  # every part landed somewhere: no copy to keep
        return error


@dataclass(frozen=True)
class _Return:
    """Rows `ids` of table `table` that export `seq` (at hot map `version`) of cold shard `cold`
    handed over and this hot shard did not take: to be given back."""

    cold: int
    table: str
    ids: np.ndarray
    version: int
    seq: int
