"""Migration: rows move between the cold shards and a hot shard as a placement policy decides.

Runs in the hot shard's process, on a background thread, never inside a request. Each round it
drains the reads every shard served (and the look-ahead ids of held fetches), feeds them to one
`Policy` per table (only ids whose hot home is this shard: id % num_hot), asks it for a plan, and
moves rows in batches with their optimizer state:

- promote: the cold home exports the rows (removed there, answered "moved" from then on), the hot
  shard imports them; then they are hot.
- demote: the hot shard exports them (answered "moved"), their cold homes import them.

A row is in flight between the export and the import, and requests for it are refused with
RowsMoved until it lands, so no fetch sees a stale copy and no push is applied to one; the client
refreshes its hot map and re-sends (memory_service/client.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from memory_service import wire
from memory_service.placement import Policy, make_policy
from memory_service.rpc import memory_pb2, memory_pb2_grpc
from memory_service.security import ClientSecurity, open_channel
from memory_service.shard import Shard


@dataclass
class MigrationCounters:
    rounds: int = 0
    promoted: int = 0  # rows moved cold -> hot
    demoted: int = 0  # rows moved hot -> cold


class Migrator:
    """Places rows of every table between `cold_targets` (gRPC, cold shard order) and the local
    hot shard `hot` (hot shard `hot.shard_id` of `hot.num_shards`), `capacity` rows per table.
    `security`: how to reach secured cold shards (a write token: exports and imports are writes)."""

    def __init__(self, hot: Shard, cold_targets: list[str], capacity: int, policy: str = "engram",
                 interval_s: float = 0.05, max_moves: int = 4096, timeout: float = 30.0,
                 security: ClientSecurity | None = None):
        self.hot, self.capacity, self.policy_name = hot, capacity, policy
        self.interval_s, self.max_moves, self.timeout = interval_s, max_moves, timeout
        self.channels = [open_channel(t, wire.MESSAGE_OPTIONS, security) for t in cold_targets]
        self.cold = [memory_pb2_grpc.MemoryServiceStub(c) for c in self.channels]
        self.policies: dict[str, Policy] = {}
        self.counters = MigrationCounters()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> "Migrator":
        self._thread = threading.Thread(target=self._run, name="engram-migrator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the thread after the round in progress (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
            self._thread = None
            for channel in self.channels:
                channel.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.round()
            except Exception as err:  # keep serving; the next round retries, stats show the error
                self.error = err

    def round(self) -> None:
        """One round: drain the reads, plan, move."""
        self._observe()
        for name in self.hot.list_tables():
            policy = self._policy(name)
            admit, evict = policy.plan(self.hot.hot_map(name)[1], self.max_moves)
            if len(evict):
                self._demote(name, np.asarray(evict, np.int64))
            if len(admit):
                self._promote(name, np.asarray(admit, np.int64))
        self.counters.rounds += 1

    def _policy(self, name: str) -> Policy:
        if name not in self.policies:
            self.policies[name] = make_policy(self.policy_name, self.capacity)
        return self.policies[name]

    def _observe(self) -> None:
        """Feed every shard's reads (this hot shard's rows only) to the tables' policies."""
        drained = [self.hot.drain_accesses()]
        for stub in self.cold:
            reply = stub.DrainAccesses(memory_pb2.DrainAccessesRequest(), timeout=self.timeout)
            drained.append({t.table: (np.split(wire.decode_ids(t.ids, t.table),
                                               np.cumsum(wire.decode_ids(t.lengths, t.table))[:-1]),
                                      wire.decode_ids(t.expected, t.table)) for t in reply.tables})
        mine = lambda ids: ids[ids % self.hot.num_shards == self.hot.shard_id]
        for accesses in drained:
            for name, (requests, expected) in accesses.items():
                policy = self._policy(name)
                for ids in requests:
                    policy.record(mine(ids))
                if len(expected):
                    policy.expect(np.unique(mine(expected)))

    def _promote(self, name: str, ids: np.ndarray) -> None:
        version = self.hot.homes.version + 1
        width, state_width = self.hot.describe_table(name).config.width, self.hot.state_width(name)
        n = len(self.cold)
        for c in range(n):
            part = ids[ids % n == c]
            if not len(part):
                continue
            reply = self.cold[c].ExportRows(memory_pb2.ExportRowsRequest(
                table=name, ids=wire.encode_ids(part), version=version), timeout=self.timeout)
            records = wire.records_from_proto(reply, width, state_width)
            self.hot.import_rows(name, records, version, part)
            self.counters.promoted += len(part)

    def _demote(self, name: str, ids: np.ndarray) -> None:
        version = self.hot.homes.version + 1
        records = self.hot.export_rows(name, ids, version)
        n = len(self.cold)
        for c in range(n):
            part = ids[ids % n == c]
            if len(part):
                self.cold[c].ImportRows(memory_pb2.ImportRowsRequest(
                    records=wire.records_to_proto(name, records.take(records.ids % n == c)), version=version,
                    ids=wire.encode_ids(part)), timeout=self.timeout)
        self.counters.demoted += len(ids)

