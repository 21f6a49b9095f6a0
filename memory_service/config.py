"""Configuration of tables and shards: typed, checked once, shared by the shard, servicer and client."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

OPTIMIZERS = ("sparse_adam", "adam", "adagrad", "sgd")
DTYPES = ("float32", "bfloat16")
ITEMSIZE = {"float32": 4, "bfloat16": 2}  # bytes per value of each dtype
# How a frozen table stores and sends its rows (memory_service/quantization.py): as they are
# ("none"), or as one-byte codes plus a float32 scale per row.
QUANTIZATIONS = ("none", "fp8_e4m3", "int8")
MAX_TABLE_ROWS = 2**62
# The most ids a shard's access log may keep (StorageConfig.access_log_ids): 128 MiB of ids, half
# of a gRPC message (wire/codec.py's MAX_MESSAGE_BYTES), so a drained log always fits one reply.
MAX_ACCESS_LOG_IDS = 1 << 24


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer a shard applies to pushed gradients. `kind`: sparse_adam (lazy Adam with
    torch.optim.SparseAdam's semantics), adam (torch.optim.Adam on the whole dense table, at sparse
    cost: rows are caught up over the steps they skipped when read or written), adagrad
    (torch.optim.Adagrad on sparse gradients) or sgd. `lr` is the rate of pushes that name none."""

    kind: str = "sparse_adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # Adam's epsilon; Adagrad uses it too (torch default 1e-10 there: set it)
    initial_accumulator_value: float = 0.0  # Adagrad only

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"optimizer kind {self.kind!r} must be one of {OPTIMIZERS}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optimizer lr {self.lr} must be > 0 and finite")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optimizer {name} {getattr(self, name)} must be in [0, 1)")
        if not (0 < self.eps < math.inf and 0 <= self.initial_accumulator_value < math.inf):
            raise ValueError(f"optimizer eps {self.eps} must be > 0 and finite, and "
                             f"initial_accumulator_value {self.initial_accumulator_value} >= 0 and finite")


@dataclass(frozen=True)
class TableConfig:
    """One Engram table: `num_rows` rows of `width` values. Rows are created lazily from
    (seed, row id) by memory_service.rows.init_rows with std `init_scale`. `dtype` is the dtype
    rows travel in (storage and optimizer math are float32).

    A `frozen` table is read-only: it keeps no optimizer state, and pushes and commits naming it
    are refused (FAILED_PRECONDITION). Its `quantization` ("none", "fp8_e4m3", "int8"; anything
    but "none" requires `frozen`) is how its rows are stored and sent: "none" as they are, else
    quantized per row (memory_service/quantization.py), `stored_width` float32 words a row."""

    name: str
    num_rows: int
    width: int
    dtype: str = "float32"
    init_scale: float = 1.0
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Share of slots whose N-grams shards keep for collision stats (memory_service.ops.collisions);
    # 0 turns collision stats off: clients attach nothing and shards keep nothing.
    collision_sample_rate: float = 0.0
    frozen: bool = False
    quantization: str = "none"
    # What the table is in its model, as (key, value) pairs sorted by key: the trainer sets
    # layer, order and head, by which `engram stats --by` and Prometheus group tables. A dict is
    # accepted and kept sorted.
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 256 or not self.name.isprintable():
            raise ValueError(f"table name {self.name!r} must be 1..256 printable characters")
        if not 1 <= self.num_rows <= MAX_TABLE_ROWS:
            raise ValueError(f"table {self.name!r}: num_rows {self.num_rows} must be in [1, 2**62]")
        if not 1 <= self.width <= 65536:
            raise ValueError(f"table {self.name!r}: width {self.width} must be in [1, 65536]")
        if self.dtype not in DTYPES:
            raise ValueError(f"table {self.name!r}: dtype {self.dtype!r} must be one of {DTYPES}")
        if not 0 < self.init_scale < math.inf:
            raise ValueError(f"table {self.name!r}: init_scale {self.init_scale} must be > 0 and finite")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"table {self.name!r}: seed {self.seed} must be in [0, 2**64)")
        if not 0.0 <= self.collision_sample_rate <= 1.0:
            raise ValueError(f"table {self.name!r}: collision_sample_rate "
                             f"{self.collision_sample_rate} must be in [0, 1]")
        object.__setattr__(self, "labels", checked_labels(self.labels, f"table {self.name!r}"))
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"table {self.name!r}: quantization {self.quantization!r} must be one of "
                             f"{QUANTIZATIONS}")
        if self.quantization != "none" and not self.frozen:
            raise ValueError(f"table {self.name!r}: quantization {self.quantization!r} requires a frozen table")

    @property
    def is_quantized(self) -> bool:
        """Whether rows are stored and sent quantized (one-byte codes and a scale per row)."""
        return self.quantization != "none"

    @property
    def stored_width(self) -> int:
        """float32 words a stored row takes: `width`, or for a quantized table its packed row
        (a float32 scale and `width` one-byte codes: ceil((width + 4) / 4) words)."""
        return -(-(self.width + 4) // 4) if self.is_quantized else self.width

    @property
    def wire_row_bytes(self) -> int:
        """Bytes of one row in a Fetch reply: width x itemsize, or a packed row's 4 * stored_width
        (scale and codes, padded to a multiple of 4)."""
        return 4 * self.stored_width if self.is_quantized else self.width * ITEMSIZE[self.dtype]

    def to_dict(self) -> dict:
        """Plain data (a cold shard stores it beside the table's rows)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TableConfig":
        return cls(**{**data, "optimizer": OptimizerConfig(**data["optimizer"])})


MAX_LABELS = 16


def checked_labels(labels, what: str) -> tuple[tuple[str, str], ...]:
    """`labels` (a mapping or (key, value) pairs) as pairs sorted by key; ValueError naming `what`
    unless there are at most MAX_LABELS keys, each a Prometheus label name of at most 64
    characters (letters, digits, '_', not starting with a digit or '__'), each value at most 256
    printable characters."""
    pairs = sorted((labels.items() if isinstance(labels, dict) else [tuple(p) for p in labels]))
    if len(pairs) > MAX_LABELS or len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"{what}: labels must have at most {MAX_LABELS} distinct keys, got {pairs}")
    for key, value in pairs:
        if not (isinstance(key, str) and 0 < len(key) <= 64 and key.isascii()
                and (key[0].isalpha() or key[0] == "_") and key.replace("_", "a").isalnum()
                and not key.startswith("__")):
            raise ValueError(f"{what}: label key {key!r} must be 1..64 letters, digits or '_', "
                             f"not starting with a digit or '__'")
        if not (isinstance(value, str) and len(value) <= 256 and value.isprintable()):
            raise ValueError(f"{what}: label {key!r} value {value!r} must be at most 256 printable characters")
    return tuple((str(k), str(v)) for k, v in pairs)


@dataclass(frozen=True)
class StorageConfig:
    """Where a shard keeps its rows. `path` None (the default): every written row in DRAM. With a
    `path`, a cold shard: its LMDB environment lives in that directory and holds every written row,
    while DRAM keeps rows in at most `dram_budget_bytes` (split equally between the shard's
    tables; each share holds rows, optimizer state and index in 15/16 of it, the rest is left to
    the placement policy and request buffers), chosen by the placement policy named `policy`
    (memory_service/placement/policy.py). A background thread applies the policy's plans every
    `placement_interval_s` seconds, at most `max_moves` row admissions per batch under the shard's
    lock. The LMDB map starts at `map_bytes` per table (less for small tables) and doubles when
    full.

    Crash recovery (memory_service/durability/journal.py): with `wal` every change is appended to a
    write-ahead log in `path`/wal before the request is answered (handed to the OS, which a killed
    process cannot lose; with `wal_fsync` also forced to disk, at a sync per request, and LMDB
    synced at each flush: the log then survives an OS crash, LMDB as far as the file system keeps
    its write order between flushes, since it is written without syncs). Dirty
    rows are flushed to LMDB and the log restarted every `flush_interval_s` seconds or
    `flush_wal_bytes` of log, whichever comes first, and on close or SIGTERM; a restart replays
    the log since. Without `wal`, a crash loses the rows only DRAM held since their last
    eviction. An all-DRAM shard (`path` None) loses all its rows with its process.

    What a shard keeps for its callers is bounded and expires (memory_service/shard/step_parts.py,
    shard/accesses.py): data-parallel parts of steps not complete yet take at most `parts_max_bytes`
    per shard and `parts_client_max_bytes` per client (a push past either is refused with
    RESOURCE_EXHAUSTED), and a step not complete `parts_expiry_s` seconds after its first part or
    commit is dropped (its later parts and commits get FAILED_PRECONDITION). A shard that keeps
    reads for placement keeps at most `access_log_ids` ids of them, the oldest dropped first, none
    older than `access_log_expiry_s` seconds.

    Checkpoints (memory_service/durability/checkpoint.py): shards write and read checkpoint files
    only under `checkpoint_root`, a directory of the cluster (the same for every shard, cold and
    hot; shared with the driver on a multi-host cluster); a CheckpointSave or CheckpointRestore
    naming a path outside it (`..`, a symlink pointing out) is refused. None: `checkpoints/` under
    `path` for a cluster with disk storage (`checkpoint_dir`); an all-DRAM cluster without one
    refuses checkpoints until it is set.

    `direct_reads`: a shard with its rows in host DRAM keeps them (rows, last steps, index) in
    shared memory under /dev/shm, where clients on its host read them without a request
    (memory_service/storage/tiers/shared_arena.py, wire/direct_reads.py; off where the compiled
    reader is not built)."""

    path: str | None = None
    dram_budget_bytes: int = 1 << 30
    policy: str = "recent"  # bounded by the budget (placement.BOUNDED_POLICIES)
    placement_interval_s: float = 0.1
    max_moves: int = 16384  # a batch holds the shard's lock for ~25 ms of LMDB reads here
    map_bytes: int = 1 << 30
    wal: bool = True
    wal_fsync: bool = False
    flush_interval_s: float = 60.0
    flush_wal_bytes: int = 256 << 20
    parts_max_bytes: int = 2 << 30
    parts_client_max_bytes: int = 512 << 20  # two steps in flight of a 64k x 1024 fp32 part
    parts_expiry_s: float = 300.0
    access_log_ids: int = 1 << 22  # 32 MiB of ids: a DrainAccesses reply always fits a message
    access_log_expiry_s: float = 60.0
    checkpoint_root: str | None = None  # where checkpoints may be written (None: <path>/checkpoints)
    direct_reads: bool = True

    def __post_init__(self) -> None:
        if self.path is not None and not self.path:
            raise ValueError("storage path must be a directory or None, not empty")
        if self.dram_budget_bytes < 0:
            raise ValueError(f"dram_budget_bytes {self.dram_budget_bytes} must be >= 0")
        if not self.policy:
            raise ValueError("storage policy must name a placement policy")
        if not self.placement_interval_s > 0:
            raise ValueError(f"placement_interval_s {self.placement_interval_s} must be > 0")
        if self.max_moves < 1:
            raise ValueError(f"max_moves {self.max_moves} must be >= 1")
        if self.map_bytes < 1 << 20:
            raise ValueError(f"map_bytes {self.map_bytes} must be >= 1 MiB")
        if self.checkpoint_root is not None and not os.path.isabs(self.checkpoint_root):
            raise ValueError(f"checkpoint_root {self.checkpoint_root!r} must be an absolute path")
        if not self.flush_interval_s > 0 or self.flush_wal_bytes < 1:
            raise ValueError(f"flush_interval_s {self.flush_interval_s} must be > 0 and flush_wal_bytes "
                             f"{self.flush_wal_bytes} >= 1")
        if not 1 <= self.parts_client_max_bytes <= self.parts_max_bytes:
            raise ValueError(f"parts_client_max_bytes {self.parts_client_max_bytes} must be in "
                             f"[1, parts_max_bytes {self.parts_max_bytes}]")
        if not (self.parts_expiry_s > 0 and self.access_log_expiry_s > 0):
            raise ValueError(f"parts_expiry_s {self.parts_expiry_s} and access_log_expiry_s "
                             f"{self.access_log_expiry_s} must be > 0")
        if not 1 <= self.access_log_ids <= MAX_ACCESS_LOG_IDS:
            raise ValueError(f"access_log_ids {self.access_log_ids} must be in [1, {MAX_ACCESS_LOG_IDS}]")

    @property
    def checkpoint_dir(self) -> str | None:
        """The cluster's checkpoint root: `checkpoint_root`, else `path`/checkpoints, else None."""
        if self.checkpoint_root is not None:
            return self.checkpoint_root
        return os.path.join(self.path, "checkpoints") if self.path is not None else None

    def for_shard(self, shard_id: int) -> "StorageConfig":
        """The config of shard `shard_id`: its own subdirectory of `path` (the checkpoint root
        stays the cluster's)."""
        if self.path is None:
            return self
        return dataclasses.replace(self, path=os.path.join(self.path, f"shard-{shard_id:04d}"),
                                   checkpoint_root=self.checkpoint_dir)

    def for_hot_shard(self, shard_id: int) -> "StorageConfig":
        """The config of hot shard `shard_id`: its own subdirectory `hot-NNNN` of `path`, beside
        the cold shards' (a hot shard logs and checkpoints as a cold one does, so a crash of it
        loses nothing either); the checkpoint root stays the cluster's."""
        if self.path is None:
            return self
        return dataclasses.replace(self, path=os.path.join(self.path, f"hot-{shard_id:04d}"),
                                   checkpoint_root=self.checkpoint_dir)


def namespace_of(name: str) -> str:
    """The namespace of table `name`: its name up to the first "/" ("" without one, the default
    namespace). The trainer names tables `<prefix>/layer<L>/head<h>`, so a training run's
    `--prefix` is its namespace; tokens and quotas are scoped by it (wire/security.py,
    shard/quotas.py)."""
    head, sep, _ = name.partition("/")
    return head if sep else ""
