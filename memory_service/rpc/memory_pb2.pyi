from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FP8_E4M3: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]

class OptimizerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_KIND_UNSPECIFIED: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_SPARSE_ADAM: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_ADAGRAD: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_SGD: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_ADAM: _ClassVar[OptimizerKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FP8_E4M3: DType
DTYPE_INT8: DType
OPTIMIZER_KIND_UNSPECIFIED: OptimizerKind
OPTIMIZER_KIND_SPARSE_ADAM: OptimizerKind
OPTIMIZER_KIND_ADAGRAD: OptimizerKind
OPTIMIZER_KIND_SGD: OptimizerKind
OPTIMIZER_KIND_ADAM: OptimizerKind

class OptimizerConfig(_message.Message):
    __slots__ = ("kind", "lr", "beta1", "beta2", "eps", "initial_accumulator_value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: OptimizerKind
    lr: float
    beta1: float
    beta2: float
    eps: float
    initial_accumulator_value: float
    def __init__(self, kind: _Optional[_Union[OptimizerKind, str]] = ..., lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ...) -> None: ...

class TableConfig(_message.Message):
    __slots__ = ("name", "num_rows", "width", "dtype", "init_scale", "seed", "optimizer", "collision_sample_rate", "labels", "frozen", "quantization")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    COLLISION_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    width: int
    dtype: DType
    init_scale: float
    seed: int
    optimizer: OptimizerConfig
    collision_sample_rate: float
    labels: _containers.ScalarMap[str, str]
    frozen: bool
    quantization: str
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., width: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., init_scale: _Optional[float] = ..., seed: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., collision_sample_rate: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., frozen: _Optional[bool] = ..., quantization: _Optional[str] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("config", "step", "rows_materialized", "nbytes", "optimizer_rows")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_MATERIALIZED_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ROWS_FIELD_NUMBER: _ClassVar[int]
    config: TableConfig
    step: int
    rows_materialized: int
    nbytes: int
    optimizer_rows: int
    def __init__(self, config: _Optional[_Union[TableConfig, _Mapping]] = ..., step: _Optional[int] = ..., rows_materialized: _Optional[int] = ..., nbytes: _Optional[int] = ..., optimizer_rows: _Optional[int] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: TableConfig
    def __init__(self, config: _Optional[_Union[TableConfig, _Mapping]] = ...) -> None: ...

class DescribeTableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropTableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropTableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class TableIds(_message.Message):
    __slots__ = ("table", "ids", "reply_offset", "ngrams")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    REPLY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NGRAMS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    reply_offset: int
    ngrams: NgramSample
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., reply_offset: _Optional[int] = ..., ngrams: _Optional[_Union[NgramSample, _Mapping]] = ...) -> None: ...

class NgramSample(_message.Message):
    __slots__ = ("lookups", "fingerprints", "mixed", "pair_index", "pair_fingerprints", "pair_lookups")
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    MIXED_FIELD_NUMBER: _ClassVar[int]
    PAIR_INDEX_FIELD_NUMBER: _ClassVar[int]
    PAIR_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    PAIR_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    lookups: bytes
    fingerprints: bytes
    mixed: bytes
    pair_index: bytes
    pair_fingerprints: bytes
    pair_lookups: bytes
    def __init__(self, lookups: _Optional[bytes] = ..., fingerprints: _Optional[bytes] = ..., mixed: _Optional[bytes] = ..., pair_index: _Optional[bytes] = ..., pair_fingerprints: _Optional[bytes] = ..., pair_lookups: _Optional[bytes] = ...) -> None: ...

class TableRows(_message.Message):
    __slots__ = ("table", "dtype", "width", "rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    dtype: DType
    width: int
    rows: bytes
    def __init__(self, table: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., width: _Optional[int] = ..., rows: _Optional[bytes] = ...) -> None: ...

class SharedMemoryReply(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("tables", "shared_memory", "min_step")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableIds]
    shared_memory: SharedMemoryReply
    min_step: int
    def __init__(self, tables: _Optional[_Iterable[_Union[TableIds, _Mapping]]] = ..., shared_memory: _Optional[_Union[SharedMemoryReply, _Mapping]] = ..., min_step: _Optional[int] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableRows]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ...) -> None: ...

class TableGrads(_message.Message):
    __slots__ = ("table", "step", "dtype", "width", "ids", "grads", "lr")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    table: str
    step: int
    dtype: DType
    width: int
    ids: bytes
    grads: bytes
    lr: float
    def __init__(self, table: _Optional[str] = ..., step: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., width: _Optional[int] = ..., ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., lr: _Optional[float] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("client_id", "tables", "contributors", "commit_later", "request_seq", "announce")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_LATER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    tables: _containers.RepeatedCompositeFieldContainer[TableGrads]
    contributors: int
    commit_later: bool
    request_seq: int
    announce: AnnounceRequest
    def __init__(self, client_id: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableGrads, _Mapping]]] = ..., contributors: _Optional[int] = ..., commit_later: _Optional[bool] = ..., request_seq: _Optional[int] = ..., announce: _Optional[_Union[AnnounceRequest, _Mapping]] = ...) -> None: ...

class TableStep(_message.Message):
    __slots__ = ("table", "step", "lr")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    table: str
    step: int
    lr: float
    def __init__(self, table: _Optional[str] = ..., step: _Optional[int] = ..., lr: _Optional[float] = ...) -> None: ...

class CommitStepRequest(_message.Message):
    __slots__ = ("client_id", "tables", "contributors", "request_seq")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    tables: _containers.RepeatedCompositeFieldContainer[TableStep]
    contributors: int
    request_seq: int
    def __init__(self, client_id: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableStep, _Mapping]]] = ..., contributors: _Optional[int] = ..., request_seq: _Optional[int] = ...) -> None: ...

class CommitStepResponse(_message.Message):
    __slots__ = ("rows_updated",)
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    def __init__(self, rows_updated: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("rows_updated",)
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    def __init__(self, rows_updated: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RpcStats(_message.Message):
    __slots__ = ("requests", "rows", "requests_per_s", "rows_per_s", "p50_seconds", "p99_seconds", "window_seconds", "errors")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_S_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    rows: int
    requests_per_s: float
    rows_per_s: float
    p50_seconds: float
    p99_seconds: float
    window_seconds: float
    errors: int
    def __init__(self, requests: _Optional[int] = ..., rows: _Optional[int] = ..., requests_per_s: _Optional[float] = ..., rows_per_s: _Optional[float] = ..., p50_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ..., window_seconds: _Optional[float] = ..., errors: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "rows", "bytes", "hits", "misses", "promotions", "demotions", "dirty_rows")
    TIER_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_ROWS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    rows: int
    bytes: int
    hits: int
    misses: int
    promotions: int
    demotions: int
    dirty_rows: int
    def __init__(self, tier: _Optional[str] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., dirty_rows: _Optional[int] = ...) -> None: ...

class CollisionStats(_message.Message):
    __slots__ = ("sample_rate", "tracked_slots", "exact", "lookups", "colliding_lookups", "sampled_slots_touched", "sampled_distinct_ngrams", "sampled_max_distinct", "sampled_lookups", "sampled_colliding_lookups", "saturated_slots")
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    TRACKED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    COLLIDING_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_SLOTS_TOUCHED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_DISTINCT_NGRAMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_MAX_DISTINCT_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_COLLIDING_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    SATURATED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    sample_rate: float
    tracked_slots: int
    exact: bool
    lookups: int
    colliding_lookups: int
    sampled_slots_touched: int
    sampled_distinct_ngrams: int
    sampled_max_distinct: int
    sampled_lookups: int
    sampled_colliding_lookups: int
    saturated_slots: int
    def __init__(self, sample_rate: _Optional[float] = ..., tracked_slots: _Optional[int] = ..., exact: _Optional[bool] = ..., lookups: _Optional[int] = ..., colliding_lookups: _Optional[int] = ..., sampled_slots_touched: _Optional[int] = ..., sampled_distinct_ngrams: _Optional[int] = ..., sampled_max_distinct: _Optional[int] = ..., sampled_lookups: _Optional[int] = ..., sampled_colliding_lookups: _Optional[int] = ..., saturated_slots: _Optional[int] = ...) -> None: ...

class ShardCounters(_message.Message):
    __slots__ = ("fetch_requests", "fetch_rows", "push_requests", "push_rows")
    FETCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FETCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    PUSH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PUSH_ROWS_FIELD_NUMBER: _ClassVar[int]
    fetch_requests: int
    fetch_rows: int
    push_requests: int
    push_rows: int
    def __init__(self, fetch_requests: _Optional[int] = ..., fetch_rows: _Optional[int] = ..., push_requests: _Optional[int] = ..., push_rows: _Optional[int] = ...) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("name", "num_rows", "width", "step", "rows_materialized", "nbytes", "optimizer_rows", "tiers", "optimizer_state_bytes", "rows_read", "collisions", "reads", "labels", "dram_row_bytes", "disk_row_bytes", "wire_row_bytes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_MATERIALIZED_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ROWS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROWS_READ_FIELD_NUMBER: _ClassVar[int]
    COLLISIONS_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DRAM_ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    width: int
    step: int
    rows_materialized: int
    nbytes: int
    optimizer_rows: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    optimizer_state_bytes: int
    rows_read: int
    collisions: CollisionStats
    reads: int
    labels: _containers.ScalarMap[str, str]
    dram_row_bytes: int
    disk_row_bytes: int
    wire_row_bytes: int
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., width: _Optional[int] = ..., step: _Optional[int] = ..., rows_materialized: _Optional[int] = ..., nbytes: _Optional[int] = ..., optimizer_rows: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., optimizer_state_bytes: _Optional[int] = ..., rows_read: _Optional[int] = ..., collisions: _Optional[_Union[CollisionStats, _Mapping]] = ..., reads: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., dram_row_bytes: _Optional[int] = ..., disk_row_bytes: _Optional[int] = ..., wire_row_bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "num_shards", "counters", "tables", "fetch", "push", "uptime_seconds", "metrics_port", "wal_replayed", "role")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    WAL_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    counters: ShardCounters
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    fetch: RpcStats
    push: RpcStats
    uptime_seconds: float
    metrics_port: int
    wal_replayed: int
    role: str
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., counters: _Optional[_Union[ShardCounters, _Mapping]] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ..., fetch: _Optional[_Union[RpcStats, _Mapping]] = ..., push: _Optional[_Union[RpcStats, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., metrics_port: _Optional[int] = ..., wal_replayed: _Optional[int] = ..., role: _Optional[str] = ...) -> None: ...

class AnnounceRequest(_message.Message):
    __slots__ = ("tables", "step", "direct_reads", "direct_fetches", "direct_table_reads", "direct_computed")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DIRECT_READS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FETCHES_FIELD_NUMBER: _ClassVar[int]
    DIRECT_TABLE_READS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableIds]
    step: int
    direct_reads: _containers.RepeatedCompositeFieldContainer[TableIds]
    direct_fetches: int
    direct_table_reads: bytes
    direct_computed: bytes
    def __init__(self, tables: _Optional[_Iterable[_Union[TableIds, _Mapping]]] = ..., step: _Optional[int] = ..., direct_reads: _Optional[_Iterable[_Union[TableIds, _Mapping]]] = ..., direct_fetches: _Optional[int] = ..., direct_table_reads: _Optional[bytes] = ..., direct_computed: _Optional[bytes] = ...) -> None: ...

class AnnounceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DirectReadsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DirectReadsResponse(_message.Message):
    __slots__ = ("path", "nonce")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    path: str
    nonce: bytes
    def __init__(self, path: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class ExportRowsRequest(_message.Message):
    __slots__ = ("table", "ids", "version", "client_id", "request_seq")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    version: int
    client_id: str
    request_seq: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., version: _Optional[int] = ..., client_id: _Optional[str] = ..., request_seq: _Optional[int] = ...) -> None: ...

class RowRecords(_message.Message):
    __slots__ = ("table", "ids", "rows", "state", "last", "log", "state_width")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    STATE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    rows: bytes
    state: bytes
    last: bytes
    log: StepLog
    state_width: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., state: _Optional[bytes] = ..., last: _Optional[bytes] = ..., log: _Optional[_Union[StepLog, _Mapping]] = ..., state_width: _Optional[int] = ...) -> None: ...

class ImportRowsRequest(_message.Message):
    __slots__ = ("records", "version", "ids")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    records: RowRecords
    version: int
    ids: bytes
    def __init__(self, records: _Optional[_Union[RowRecords, _Mapping]] = ..., version: _Optional[int] = ..., ids: _Optional[bytes] = ...) -> None: ...

class ImportRowsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReturnRowsRequest(_message.Message):
    __slots__ = ("table", "ids", "version", "client_id", "request_seq")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    version: int
    client_id: str
    request_seq: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., version: _Optional[int] = ..., client_id: _Optional[str] = ..., request_seq: _Optional[int] = ...) -> None: ...

class ReturnRowsResponse(_message.Message):
    __slots__ = ("rows_returned",)
    ROWS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    rows_returned: int
    def __init__(self, rows_returned: _Optional[int] = ...) -> None: ...

class HotMapRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class HotMapResponse(_message.Message):
    __slots__ = ("version", "ids")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    ids: bytes
    def __init__(self, version: _Optional[int] = ..., ids: _Optional[bytes] = ...) -> None: ...

class DrainAccessesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableAccesses(_message.Message):
    __slots__ = ("table", "ids", "lengths", "tags")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    lengths: bytes
    tags: bytes
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., lengths: _Optional[bytes] = ..., tags: _Optional[bytes] = ...) -> None: ...

class DrainAccessesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableAccesses]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableAccesses, _Mapping]]] = ...) -> None: ...

class CheckpointPauseRequest(_message.Message):
    __slots__ = ("pause", "lease_seconds", "timeout_seconds")
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pause: bool
    lease_seconds: float
    timeout_seconds: float
    def __init__(self, pause: _Optional[bool] = ..., lease_seconds: _Optional[float] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class CheckpointPauseResponse(_message.Message):
    __slots__ = ("held",)
    HELD_FIELD_NUMBER: _ClassVar[int]
    held: bool
    def __init__(self, held: _Optional[bool] = ...) -> None: ...

class CheckpointSaveRequest(_message.Message):
    __slots__ = ("path", "step", "tables", "wait_seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    tables: _containers.RepeatedScalarFieldContainer[str]
    wait_seconds: float
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., tables: _Optional[_Iterable[str]] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class CheckpointFile(_message.Message):
    __slots__ = ("path", "bytes", "sha256", "kind", "table", "rows")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    path: str
    bytes: int
    sha256: str
    kind: str
    table: str
    rows: int
    def __init__(self, path: _Optional[str] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., kind: _Optional[str] = ..., table: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...

class CheckpointSaveResponse(_message.Message):
    __slots__ = ("role", "shard_id", "num_shards", "files")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    role: str
    shard_id: int
    num_shards: int
    files: _containers.RepeatedCompositeFieldContainer[CheckpointFile]
    def __init__(self, role: _Optional[str] = ..., shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., files: _Optional[_Iterable[_Union[CheckpointFile, _Mapping]]] = ...) -> None: ...

class CheckpointRestoreRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class CheckpointTableRows(_message.Message):
    __slots__ = ("table", "rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows: int
    def __init__(self, table: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...

class CheckpointRestoreResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[CheckpointTableRows]
    def __init__(self, tables: _Optional[_Iterable[_Union[CheckpointTableRows, _Mapping]]] = ...) -> None: ...

class FreezeTableRequest(_message.Message):
    __slots__ = ("table", "quantization")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    table: str
    quantization: str
    def __init__(self, table: _Optional[str] = ..., quantization: _Optional[str] = ...) -> None: ...

class FreezeTableResponse(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: TableInfo
    def __init__(self, table: _Optional[_Union[TableInfo, _Mapping]] = ...) -> None: ...

class StepLog(_message.Message):
    __slots__ = ("step", "steps", "lrs")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LRS_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps: bytes
    lrs: bytes
    def __init__(self, step: _Optional[int] = ..., steps: _Optional[bytes] = ..., lrs: _Optional[bytes] = ...) -> None: ...

class WriteRecordsRequest(_message.Message):
    __slots__ = ("records", "log")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    records: RowRecords
    log: StepLog
    def __init__(self, records: _Optional[_Union[RowRecords, _Mapping]] = ..., log: _Optional[_Union[StepLog, _Mapping]] = ...) -> None: ...

class WriteRecordsResponse(_message.Message):
    __slots__ = ("rows_written",)
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    rows_written: int
    def __init__(self, rows_written: _Optional[int] = ...) -> None: ...

class ReadRecordsRequest(_message.Message):
    __slots__ = ("table", "ids", "with_log")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WITH_LOG_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    with_log: bool
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., with_log: _Optional[bool] = ...) -> None: ...
