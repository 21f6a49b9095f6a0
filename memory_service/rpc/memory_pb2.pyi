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
    __slots__ = ("name", "num_rows", "width", "dtype", "init_scale", "seed", "optimizer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    width: int
    dtype: DType
    init_scale: float
    seed: int
    optimizer: OptimizerConfig
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., width: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., init_scale: _Optional[float] = ..., seed: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("table", "ids", "reply_offset")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    REPLY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    reply_offset: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., reply_offset: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("client_id", "tables", "contributors")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    tables: _containers.RepeatedCompositeFieldContainer[TableGrads]
    contributors: int
    def __init__(self, client_id: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableGrads, _Mapping]]] = ..., contributors: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("rows_updated",)
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    def __init__(self, rows_updated: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

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
    __slots__ = ("name", "num_rows", "width", "step", "rows_materialized", "nbytes", "optimizer_rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_MATERIALIZED_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    width: int
    step: int
    rows_materialized: int
    nbytes: int
    optimizer_rows: int
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., width: _Optional[int] = ..., step: _Optional[int] = ..., rows_materialized: _Optional[int] = ..., nbytes: _Optional[int] = ..., optimizer_rows: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "num_shards", "counters", "tables")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    counters: ShardCounters
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., counters: _Optional[_Union[ShardCounters, _Mapping]] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ...) -> None: ...
