"""Client side of WriteRecords and ReadRecords: a table's records routed to their cold shards.

Row r's records go to (come from) cold shard r % num_cold, split into requests of at most
WRITE_REQUEST_BYTES (reads: codec.MAX_REPLY_BYTES) of records each, so neither end holds more
than that per request, all shards' requests in flight at once. A write is idempotent (it sets rows), so the transport may
re-send it to a restarted shard. Rows hot on a hot shard are not routed there: a cold shard refuses
them (RowsMoved); import and export are for tables without hot rows.
"""
from __future__ import annotations

import numpy as np

from memory_service.rpc import memory_pb2
from memory_service.sharding import shard_of
from memory_service.storage.tiers.base import RowRecords
from memory_service.wire import codec, row_record_messages
from memory_service.wire.transport import Transport


# Bytes of records per WriteRecords: each one is copied ~4 times on its way (numpy, message,
# serialized, the shard's parse), so smaller requests keep both ends' memory small; 8 MiB costs
# no measurable throughput against 32 MiB (bench/bench_import.py).
WRITE_REQUEST_BYTES = 8 << 20


def rows_per_request(width: int, state_width: int, max_bytes: int = codec.MAX_REPLY_BYTES) -> int:
    """Records per request within `max_bytes` (float32 row and state, int64 id and last)."""
    return max(1, max_bytes // codec.record_nbytes(width, state_width))


def write(transport: Transport, num_cold: int, table: str, ids: np.ndarray, rows: np.ndarray,
          state: np.ndarray | None, last: np.ndarray | None, state_width: int,
          log: dict[str, np.ndarray] | None = None) -> int:
    """Sets rows (n, width) of distinct `ids` (n,) (with state (n, state_width) and last (n,), or
    neither) on their shards; with `log`, every shard first takes the table's step log. Returns the
    rows written once every shard acknowledged (durably: each logs before it answers)."""
    homes = shard_of(ids, num_cold)
    step = rows_per_request(rows.shape[1], state_width if state is not None else 0, WRITE_REQUEST_BYTES)
    futures = []
    for shard in range(num_cold):
        at = np.flatnonzero(homes == shard)
        if log is not None or len(at):
            first = True
            for start in range(0, max(len(at), 1), step):
                part = at[start:start + step]
                request = row_record_messages.write_request(
                    table, ids[part], rows[part], None if state is None else state[part],
                    None if last is None else last[part], log if first else None)
                futures.append(transport.start(shard, "WriteRecords", request))
                first = False
    return sum(transport.result(f).rows_written for f in futures)


def read(transport: Transport, num_cold: int, table: str, ids: np.ndarray, width: int,
         state_width: int) -> RowRecords:
    """Records of `ids` (n,) in their order, exactly as stored (ReadRecords), from their shards."""
    homes = shard_of(ids, num_cold)
    step = rows_per_request(width, state_width)
    parts = []
    for shard in range(num_cold):
        at = np.flatnonzero(homes == shard)
        for start in range(0, len(at), step):
            part = at[start:start + step]
            request = memory_pb2.ReadRecordsRequest(table=table, ids=codec.encode_ids(ids[part]))
            parts.append((part, transport.start(shard, "ReadRecords", request)))
    out = RowRecords(np.asarray(ids, np.int64), np.empty((len(ids), width), np.float32),
                     np.empty((len(ids), state_width), np.float32), np.empty(len(ids), np.int64))
    for part, future in parts:
        got = codec.records_from_proto(transport.result(future), width, state_width)
        out.rows[part], out.state[part], out.last[part] = got.rows, got.state, got.last
    return out


def log_of(reply: memory_pb2.RowRecords, table: str) -> dict[str, np.ndarray]:
    """The step log a ReadRecords with with_log returned."""
    return row_record_messages.log_from_proto(reply.log, table)
