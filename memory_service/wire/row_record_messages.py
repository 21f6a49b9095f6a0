"""WriteRecords and ReadRecords messages <-> numpy (the import and export rpcs' payloads).

Records travel as RowRecords messages (codec.records_to_proto: float32 rows and state, int64 ids and
last steps, little-endian); a write may leave state and last empty (an import without optimizer
state) and may carry the table's step log (StepLog: int64 steps, float64 learning rates).
"""
from __future__ import annotations

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.rpc import memory_pb2
from memory_service.storage.tiers.base import RowRecords
from memory_service.wire import codec


def write_request(table: str, ids: np.ndarray, rows: np.ndarray, state: np.ndarray | None = None,
                  last: np.ndarray | None = None, log: dict[str, np.ndarray] | None = None
                  ) -> memory_pb2.WriteRecordsRequest:
    """A WriteRecords of rows (n, width) of distinct `ids` (n,), with state (n, state_width) and
    last (n,) or neither, and optionally the step log {"step", "steps", "lrs"}."""
    records = memory_pb2.RowRecords(table=table, ids=codec.encode_ids(ids),
                                    rows=np.ascontiguousarray(rows, "<f4").tobytes())
    if state is not None:
        records.state = np.ascontiguousarray(state, "<f4").tobytes()
        records.last = codec.encode_ids(last)
    request = memory_pb2.WriteRecordsRequest(records=records)
    if log is not None:
        request.log.CopyFrom(log_to_proto(log))
    return request


def log_to_proto(log: dict[str, np.ndarray]) -> memory_pb2.StepLog:
    """{"step", "steps" (k,) int64, "lrs" (k,) float64} (optimizer.log_state()) -> StepLog."""
    return memory_pb2.StepLog(step=int(log["step"]), steps=codec.encode_ids(log["steps"]),
                              lrs=np.ascontiguousarray(log["lrs"], "<f8").tobytes())


def records_from_request(request: memory_pb2.WriteRecordsRequest, width: int, state_width: int
                         ) -> tuple[RowRecords, bool, dict[str, np.ndarray] | None]:
    """(records, whether they carry state, the step log or None) of a WriteRecords, every payload
    length checked (InvalidArgument)."""
    msg = request.records
    has_state = bool(msg.state or msg.last)
    if has_state:
        records = codec.records_from_proto(msg, width, state_width)
    else:
        ids = codec.decode_ids(msg.ids, msg.table)
        if len(msg.rows) != 4 * len(ids) * width:
            raise InvalidArgument(f"table {msg.table!r}: {len(msg.rows)} bytes of rows do not match "
                                  f"{len(ids)} rows of width {width} (float32)")
        rows = np.frombuffer(msg.rows, "<f4").reshape(len(ids), width)
        records = RowRecords(ids, rows, np.empty((len(ids), 0), np.float32), np.empty(len(ids), np.int64))
    return records, has_state, (log_from_proto(request.log, msg.table) if request.HasField("log") else None)


def log_from_proto(msg: memory_pb2.StepLog, table: str) -> dict[str, np.ndarray]:
    """StepLog -> {"step": int64, "steps": (k,) int64, "lrs": (k,) float64}."""
    if len(msg.lrs) % 8:
        raise InvalidArgument(f"table {table!r}: step log learning rates of {len(msg.lrs)} bytes (float64: 8 each)")
    return {"step": np.int64(msg.step), "steps": codec.decode_ids(msg.steps, table),
            "lrs": np.frombuffer(msg.lrs, "<f8").copy()}
