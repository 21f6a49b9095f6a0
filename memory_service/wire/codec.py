"""Messages <-> numpy arrays and config dataclasses: the one place that knows the wire formats of
proto/engram_memory/v1/memory.proto, shared by the servicer and the client.

Ids travel as int64 little-endian bytes, rows and gradients as row-major little-endian fp32 or bf16
bytes. Decoding is zero-copy where the format allows (`np.frombuffer` over the message's bytes: the
arrays are read-only views); bf16 decoding widens to a new float32 array.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memory_service.ops.collisions import CollisionCounts, NgramBatch
from memory_service.config import ITEMSIZE, OptimizerConfig, TableConfig  # ITEMSIZE: re-exported
from memory_service.errors import FailedPrecondition, InvalidArgument

from memory_service.rpc import memory_pb2
from memory_service.tables import TableInfo
from memory_service.ops.reports import RpcWindow, ShardCounters, ShardReport, TableUsage
from memory_service.storage.usage import TierUsage

# The largest message: 65536 rows x width 1024 fp32 = 256 MiB of rows (plus 512 KiB of ids), what
# the migrator's ExportRows/ImportRows may carry; MemoryClient's requests are smaller
# (MAX_REPLY_BYTES). gRPC's default 4 MiB receive limit would stop a 64k x 64 fp32 fetch (16 MiB).
MAX_BATCH_ROWS = 65536
MAX_BATCH_WIDTH = 1024
# 256 MiB of rows + 4 MiB for ids and framing = 260 MiB (272_629_760 bytes), far below gRPC's 2 GiB
# hard cap. Servers and channels use it for both send and receive.
MAX_MESSAGE_BYTES = MAX_BATCH_ROWS * MAX_BATCH_WIDTH * 4 + 4 * 2**20
# What one request may ask of a shard, checked before anything is allocated for it (RESOURCE_EXHAUSTED
# beyond): row ids summed over its tables (32 MiB of ids; MemoryClient never sends more), and the
# bytes of rows a reply would carry, which bound what a request costs the shard
# (memory_service/server/budgets.py): Fetch rows in the wire dtype, at most MAX_REPLY_BYTES (32 MiB:
# a 1024-id fetch of a 65536-wide table, allowed under the former 256 MiB, took 36 s and 3.7 GiB);
# ExportRows rows + optimizer state, at most MAX_EXPORT_BYTES (the hot shards' migrator sends
# batches of up to 4096 rows whatever their width and needs the room). MemoryClient splits its
# fetches and pushes into requests of at most MAX_REPLY_BYTES of rows.
MAX_REQUEST_ROWS = 1 << 22
MAX_REPLY_BYTES = 32 * 2**20
MAX_EXPORT_BYTES = MAX_BATCH_ROWS * MAX_BATCH_WIDTH * 4
MESSAGE_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

_DTYPE_TO_PROTO = {"float32": memory_pb2.DTYPE_FLOAT32, "bfloat16": memory_pb2.DTYPE_BFLOAT16}
_DTYPE_FROM_PROTO = {v: k for k, v in _DTYPE_TO_PROTO.items()}
# Fetch replies of quantized (frozen) tables carry packed rows (memory_service/quantization.py)
_WIRE_TO_PROTO = {**_DTYPE_TO_PROTO, "fp8_e4m3": memory_pb2.DTYPE_FP8_E4M3, "int8": memory_pb2.DTYPE_INT8}
_OPTIMIZER_TO_PROTO = {
    "sparse_adam": memory_pb2.OPTIMIZER_KIND_SPARSE_ADAM,
    "adagrad": memory_pb2.OPTIMIZER_KIND_ADAGRAD,
    "sgd": memory_pb2.OPTIMIZER_KIND_SGD,
    "adam": memory_pb2.OPTIMIZER_KIND_ADAM,
}
_OPTIMIZER_FROM_PROTO = {v: k for k, v in _OPTIMIZER_TO_PROTO.items()}


# --- ids and rows ---------------------------------------------------------------------------------

def encode_ids(ids: np.ndarray) -> bytes:
    """Row ids (n,) of any integer dtype -> n * 8 bytes of int64 little-endian."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise InvalidArgument(f"ids must be integers, got dtype {ids.dtype}")
    return np.ascontiguousarray(ids.reshape(-1), dtype="<i8").tobytes()


def decode_ids(payload: bytes, table: str) -> np.ndarray:
    """int64 little-endian bytes -> read-only ids (n,) int64 viewing `payload` (no copy)."""
    if len(payload) % 8:
        raise InvalidArgument(f"table {table!r}: ids payload of {len(payload)} bytes is not a "
                              f"multiple of 8 (int64 ids)")
    return np.frombuffer(payload, dtype="<i8")


def lr_field(lr: float | None) -> dict[str, float]:
    """The `lr` keyword of a TableGrads or TableStep: none for None (the table's configured lr),
    so that 0.0 goes on the wire as a zero step (the field has explicit presence)."""
    return {} if lr is None else {"lr": float(lr)}


def encode_rows(rows: np.ndarray, dtype: str) -> bytes:
    """Rows (n, width) float32 -> row-major little-endian bytes in `dtype` (float32 or bfloat16)."""
    rows = np.ascontiguousarray(rows, dtype="<f4")  # (n, width); no copy when already so
    if dtype == "float32":
        return rows.tobytes()
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(rows).tobytes()
    raise InvalidArgument(f"dtype {dtype!r} must be one of {tuple(ITEMSIZE)}")


def decode_rows(payload: bytes, n: int, width: int, dtype: str, table: str) -> np.ndarray:
    """Row-major little-endian bytes -> rows (n, width) float32: a read-only view of `payload` for
    float32, a new array for bfloat16. InvalidArgument when the length is not n*width*itemsize."""
    if dtype not in ITEMSIZE:
        raise InvalidArgument(f"table {table!r}: dtype {dtype!r} must be one of {tuple(ITEMSIZE)}")
    expected = n * width * ITEMSIZE[dtype]
    if len(payload) != expected:
        raise InvalidArgument(f"table {table!r}: rows payload of {len(payload)} bytes, expected "
                              f"{expected} ({n} rows x width {width} x {ITEMSIZE[dtype]} bytes "
                              f"{dtype})")
    if dtype == "float32":
        return np.frombuffer(payload, dtype="<f4").reshape(n, width)
    return bfloat16_bits_to_float32(np.frombuffer(payload, dtype="<u2")).reshape(n, width)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bf16 bit patterns of the same shape, rounded to nearest even like
    torch's .to(torch.bfloat16): add 0x7FFF plus the lowest kept bit, keep the upper 16 bits.
    Overflow rounds to +-inf as it should. NaN is special-cased, since the add could carry it into
    inf or -0: it keeps its sign and upper payload bits, with the quiet bit set so that it stays a
    NaN. (torch writes 0x7FC0 or 0xFFFF for NaN depending on its code path: any NaN will do.)"""
    bits = np.ascontiguousarray(x, dtype="<f4").view(np.uint32)
    rounded = (bits >> 16) & 1
    rounded += 0x7FFF
    rounded += bits  # wraps only for NaN bit patterns, which are overwritten below
    out = (rounded >> 16).astype("<u2")
    nan = np.isnan(x)
    out[nan] = (bits[nan] >> 16) | 0x0040
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 array of the same shape (exact: bf16 is fp32's prefix)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def wire_dtype(cfg: TableConfig) -> str:
    """The dtype of table `cfg`'s rows in Fetch replies: its quantization, or its dtype."""
    return cfg.quantization if cfg.is_quantized else cfg.dtype


def word_dtype(cfg: TableConfig) -> str:
    """How the rows a shard reads for `cfg` are encoded for the wire: "float32" for a quantized
    table too (its packed words travel as they are stored, bytes untouched), else its dtype."""
    return "float32" if cfg.is_quantized else cfg.dtype


def wire_dtype_to_proto(cfg: TableConfig) -> int:
    """The DType enum value of table `cfg`'s rows in Fetch replies (TableRows.dtype)."""
    return _WIRE_TO_PROTO[wire_dtype(cfg)]


def check_reply_dtype(cfg: TableConfig, rows: memory_pb2.TableRows) -> None:
    """FailedPrecondition when a Fetch reply's rows are not in the dtype the client expects for
    `cfg`: the table was frozen (quantized) since the client cached its config."""
    if rows.dtype != _WIRE_TO_PROTO[wire_dtype(cfg)]:
        raise FailedPrecondition(f"table {cfg.name!r}: the shard sent {_enum_name(memory_pb2.DType, rows.dtype)} "
                                 f"rows, this client expects {wire_dtype(cfg)}: the table changed (a freeze) "
                                 f"since the client read its config; open a new client")


# --- enums ----------------------------------------------------------------------------------------

def dtype_to_proto(dtype: str) -> int:
    """'float32' / 'bfloat16' -> the DType enum value."""
    return _DTYPE_TO_PROTO[dtype]


def dtype_from_proto(value: int, what: str) -> str:
    """DType enum value -> 'float32' / 'bfloat16'; InvalidArgument (naming `what`) otherwise."""
    if value not in _DTYPE_FROM_PROTO:
        raise InvalidArgument(f"{what}: dtype {_enum_name(memory_pb2.DType, value)} must be one of "
                              f"DTYPE_FLOAT32, DTYPE_BFLOAT16")
    return _DTYPE_FROM_PROTO[value]


def _enum_name(enum, value: int) -> str:
    return enum.Name(value) if value in enum.values() else str(value)


# --- configs and table info -----------------------------------------------------------------------

def optimizer_config_to_proto(cfg: OptimizerConfig) -> memory_pb2.OptimizerConfig:
    return memory_pb2.OptimizerConfig(
        kind=_OPTIMIZER_TO_PROTO[cfg.kind], lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2,
        eps=cfg.eps, initial_accumulator_value=cfg.initial_accumulator_value)


def optimizer_config_from_proto(msg: memory_pb2.OptimizerConfig, table: str) -> OptimizerConfig:
    """InvalidArgument (naming the table) for an unknown kind or out-of-range hyperparameters."""
    if msg.kind not in _OPTIMIZER_FROM_PROTO:
        kinds = ", ".join(memory_pb2.OptimizerKind.Name(k) for k in _OPTIMIZER_FROM_PROTO)
        raise InvalidArgument(f"table {table!r}: optimizer kind "
                              f"{_enum_name(memory_pb2.OptimizerKind, msg.kind)} must be one of {kinds}")
    return _checked(f"table {table!r}: ", OptimizerConfig, kind=_OPTIMIZER_FROM_PROTO[msg.kind],
                    lr=msg.lr, beta1=msg.beta1, beta2=msg.beta2, eps=msg.eps,
                    initial_accumulator_value=msg.initial_accumulator_value)


def table_config_to_proto(cfg: TableConfig) -> memory_pb2.TableConfig:
    return memory_pb2.TableConfig(
        name=cfg.name, num_rows=cfg.num_rows, width=cfg.width, dtype=dtype_to_proto(cfg.dtype),
        init_scale=cfg.init_scale, seed=cfg.seed,
        optimizer=optimizer_config_to_proto(cfg.optimizer),
        collision_sample_rate=cfg.collision_sample_rate, frozen=cfg.frozen,
        quantization="" if cfg.quantization == "none" else cfg.quantization, labels=dict(cfg.labels))


def table_config_from_proto(msg: memory_pb2.TableConfig) -> TableConfig:
    """A checked TableConfig; InvalidArgument names the bad field and its bound."""
    if not msg.HasField("optimizer"):
        raise InvalidArgument(f"table {msg.name!r}: the optimizer config is required")
    return _checked("", TableConfig, name=msg.name, num_rows=msg.num_rows, width=msg.width,
                    dtype=dtype_from_proto(msg.dtype, f"table {msg.name!r}"),
                    init_scale=msg.init_scale, seed=msg.seed,
                    optimizer=optimizer_config_from_proto(msg.optimizer, msg.name),
                    collision_sample_rate=msg.collision_sample_rate, frozen=msg.frozen,
                    quantization=msg.quantization or "none", labels=dict(msg.labels))


def _checked(prefix: str, cls, **fields):
    """cls(**fields), with the ValueError of its __post_init__ turned into InvalidArgument."""
    try:
        return cls(**fields)
    except ValueError as err:
        raise InvalidArgument(f"{prefix}{err}") from None


def table_info_to_proto(info: TableInfo) -> memory_pb2.TableInfo:
    return memory_pb2.TableInfo(config=table_config_to_proto(info.config), step=info.step,
                                rows_materialized=info.rows_materialized, nbytes=info.nbytes,
                                optimizer_rows=info.optimizer_rows)


def table_info_from_proto(msg: memory_pb2.TableInfo) -> TableInfo:
    return TableInfo(config=table_config_from_proto(msg.config), step=msg.step,
                     rows_materialized=msg.rows_materialized, nbytes=msg.nbytes,
                     optimizer_rows=msg.optimizer_rows)



# --- N-gram samples (collision stats) -------------------------------------------------------------

def encode_ngrams(batch: NgramBatch) -> memory_pb2.NgramSample:
    """An NgramBatch -> its message (lookups and pair lookups as uint32: one batch's counts)."""
    return memory_pb2.NgramSample(
        lookups=batch.lookups.astype("<u4").tobytes(),
        fingerprints=batch.fingerprints.astype("<u8").tobytes(),
        mixed=batch.mixed.astype(np.uint8).tobytes(),
        pair_index=batch.pair_index.astype("<u4").tobytes(),
        pair_fingerprints=batch.pair_fingerprints.astype("<u8").tobytes(),
        pair_lookups=batch.pair_lookups.astype("<u4").tobytes())


def decode_ngrams(msg: memory_pb2.NgramSample, ids: np.ndarray, table: str) -> NgramBatch:
    """The N-grams behind a TableIds' ids (n,), checked: lengths, ranges, and ids distinct (a
    lookup register takes one entry per id and request). InvalidArgument names what is wrong."""
    fields = {name: _fixed_width(getattr(msg, name), dtype, f"table {table!r}: ngrams.{name}")
              for name, dtype in (("lookups", "<u4"), ("fingerprints", "<u8"), ("mixed", np.uint8),
                                  ("pair_index", "<u4"), ("pair_fingerprints", "<u8"),
                                  ("pair_lookups", "<u4"))}
    if len(np.unique(ids)) != len(ids):
        raise InvalidArgument(f"table {table!r}: ids must be distinct when ngrams are attached")
    return NgramBatch.checked(len(ids), **fields, table=table)


def _fixed_width(payload: bytes, dtype, what: str) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(payload) % itemsize:
        raise InvalidArgument(f"{what}: {len(payload)} bytes is not a multiple of {itemsize}")
    return np.frombuffer(payload, dtype=dtype)


# --- utilization (the Stats rpc) ------------------------------------------------------------------

def shard_report_to_proto(report: ShardReport) -> memory_pb2.StatsResponse:
    c = report.counters
    return memory_pb2.StatsResponse(
        shard_id=report.shard_id, num_shards=report.num_shards,
        counters=memory_pb2.ShardCounters(fetch_requests=c.fetch_requests, fetch_rows=c.fetch_rows,
                                          push_requests=c.push_requests, push_rows=c.push_rows),
        tables=[_table_usage_to_proto(t) for t in report.tables],
        fetch=_rpc_window_to_proto(report.fetch), push=_rpc_window_to_proto(report.push),
        uptime_seconds=report.uptime_s, metrics_port=report.metrics_port, role=report.role,
        wal_replayed=report.wal_replayed)


def shard_report_from_proto(msg: memory_pb2.StatsResponse) -> ShardReport:
    c = msg.counters
    return ShardReport(
        shard_id=msg.shard_id, num_shards=msg.num_shards, uptime_s=msg.uptime_seconds,
        counters=ShardCounters(c.fetch_requests, c.fetch_rows, c.push_requests, c.push_rows),
        fetch=_rpc_window_from_proto(msg.fetch), push=_rpc_window_from_proto(msg.push),
        tables=tuple(_table_usage_from_proto(t) for t in msg.tables), metrics_port=msg.metrics_port,
        role=msg.role or "cold", wal_replayed=msg.wal_replayed)


def _rpc_window_to_proto(w: RpcWindow) -> memory_pb2.RpcStats:
    return memory_pb2.RpcStats(requests=w.requests, rows=w.rows, requests_per_s=w.requests_per_s,
                               rows_per_s=w.rows_per_s, p50_seconds=w.p50_s, p99_seconds=w.p99_s,
                               window_seconds=w.window_s, errors=w.errors)


def _rpc_window_from_proto(msg: memory_pb2.RpcStats) -> RpcWindow:
    return RpcWindow(requests=msg.requests, rows=msg.rows, errors=msg.errors,
                     window_s=msg.window_seconds, p50_s=msg.p50_seconds, p99_s=msg.p99_seconds)


def _table_usage_to_proto(t: TableUsage) -> memory_pb2.TableStats:
    msg = memory_pb2.TableStats(
        name=t.name, num_rows=t.num_rows, width=t.width, step=t.step, rows_materialized=t.rows,
        nbytes=t.bytes, optimizer_rows=t.optimizer_rows,
        tiers=[memory_pb2.TierStats(**dataclasses.asdict(x)) for x in t.tiers],
        optimizer_state_bytes=t.optimizer_state_bytes, rows_read=t.rows_read, dram_row_bytes=t.dram_row_bytes,
        disk_row_bytes=t.disk_row_bytes, wire_row_bytes=t.wire_row_bytes, reads=t.reads, labels=dict(t.labels))
    if t.collisions is not None:
        msg.collisions.CopyFrom(memory_pb2.CollisionStats(**dataclasses.asdict(t.collisions)))
    return msg


def _table_usage_from_proto(msg: memory_pb2.TableStats) -> TableUsage:
    collisions = None
    if msg.HasField("collisions"):
        collisions = CollisionCounts(**{f.name: getattr(msg.collisions, f.name)
                                        for f in dataclasses.fields(CollisionCounts)})
    return TableUsage(name=msg.name, num_rows=msg.num_rows, width=msg.width, step=msg.step,
                      rows_read=msg.rows_read, optimizer_rows=msg.optimizer_rows,
                      optimizer_state_bytes=msg.optimizer_state_bytes,
                      tiers=tuple(TierUsage(**{f.name: getattr(x, f.name) for f in dataclasses.fields(TierUsage)})
                                  for x in msg.tiers),
                      collisions=collisions, dram_row_bytes=msg.dram_row_bytes,
                      disk_row_bytes=msg.disk_row_bytes, wire_row_bytes=msg.wire_row_bytes, reads=msg.reads,
                      labels=tuple(sorted(msg.labels.items())))


def record_nbytes(width: int, state_width: int) -> int:
    """Bytes of one row record in a RowRecords message: float32 row and state, int64 id and last
    step (what bounds ExportRows and ReadRecords replies, and sizes WriteRecords requests)."""
    return 4 * (width + state_width) + 16


def records_to_proto(table: str, records) -> memory_pb2.RowRecords:
    """RowRecords (memory_service.storage.tiers.base) -> message; float32 and int64 little-endian."""
    return memory_pb2.RowRecords(
        table=table, ids=encode_ids(records.ids), rows=np.ascontiguousarray(records.rows, "<f4").tobytes(),
        state=np.ascontiguousarray(records.state, "<f4").tobytes(), last=encode_ids(records.last))


def records_from_proto(msg: memory_pb2.RowRecords, width: int, state_width: int):
    """Message -> RowRecords, after checking every payload's length against the row count."""
    from memory_service.storage.tiers.base import RowRecords

    ids = decode_ids(msg.ids, msg.table)
    n = len(ids)
    if len(msg.rows) != 4 * n * width or len(msg.state) != 4 * n * state_width or len(msg.last) != 8 * n:
        raise InvalidArgument(f"table {msg.table!r}: record payloads do not match {n} rows of width "
                              f"{width} (state {state_width})")
    return RowRecords(ids, np.frombuffer(msg.rows, "<f4").reshape(n, width),
                      np.frombuffer(msg.state, "<f4").reshape(n, state_width), np.frombuffer(msg.last, "<i8"))
