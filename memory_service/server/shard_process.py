"""How a shard's process is set up, whoever starts it (a Ray actor, server/shard_actor.py, launched by memory_service/cluster.py, a plain local
process of bench/shard_processes.py): its malloc settings and its CPU priority."""
from __future__ import annotations

import os
import sys

from memory_service.config import StorageConfig

# glibc malloc settings for shard processes: without them every multi-MB gRPC message pays for
# mmap/munmap and page faults (measured here: ~2x loopback throughput for large messages).
SHARD_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
# Cold shards promise a DRAM budget instead: blocks of 4 MiB and more (a 16k-row request's arrays)
# are mmapped and given back when freed. Under SHARD_ENV they stay on a heap that is never trimmed,
# and a cold shard at rest held ~14 MiB more than its rows (tests/memory_service/shard/test_cold_memory.py). The
# mmap/munmap cost SHARD_ENV avoids is small beside a cold shard's LMDB reads.
COLD_SHARD_ENV = {"MALLOC_MMAP_THRESHOLD_": "4194304"}
# The embedded cluster's shards share the host with the trainer: at the lowest priority they run
# on the cores torch leaves idle instead of stalling its parallel regions (bench_train_overhead.py:
# the prefetch mode's step went from +14.3% over in-process tables at niceness 0 to +5.5% at 19).
LOCAL_NICENESS = 19


def shard_env(storage: StorageConfig) -> dict[str, str]:
    """Environment variables of a shard's process with this storage."""
    return SHARD_ENV if storage.path is None else COLD_SHARD_ENV


def set_priority(niceness: int) -> None:
    """This thread's niceness (Ray starts workers at its own, RAY_worker_niceness; lowering
    niceness needs CAP_SYS_NICE, so where that is missing this keeps what it has). Threads started
    afterwards (gRPC's, the migrator's) inherit it."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except (PermissionError, OSError):
        pass


def reexec_with(env: dict[str, str]) -> None:
    """Re-executes this script with `env` added to its environment unless it has it already (glibc
    and libgomp read theirs when the process starts). Benchmarks call it first with SHARD_ENV: their
    client process handles the same large gRPC messages as a shard, so both sides run under the
    same allocator settings."""
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
