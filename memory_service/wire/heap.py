"""Heap settings for a process that receives large gRPC messages: the client's side of SHARD_ENV.

glibc serves a block of 128 KiB and more with a fresh mmap and gives it back with munmap when it
is freed, so every 2 MiB fetch reply costs its pages' faults and zeroing twice over. Measured here
(a bare 2 MiB loopback reply from an aio server under SHARD_ENV, 5 runs of 40 calls, median):
the client spends 6.2-9.0 ms of CPU a call with glibc's defaults, 2.2-3.0 ms with these settings
made by mallopt at run time, the same as with SHARD_ENV set before start-up (2.8-2.9 ms). Shards
get them from their environment (memory_service/server/shard_process.py); a client runs inside
the caller's process (a trainer), which nobody re-executes, so MemoryClient sets them itself.

The bounds are moderate so a trainer's own large tensors keep glibc's behaviour: blocks below
MMAP_THRESHOLD come from the heap (the largest reply a MemoryClient asks for is
codec.MAX_REPLY_BYTES, 32 MiB), and free memory at the heap's top is given back above
TRIM_THRESHOLD.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

MMAP_THRESHOLD = 64 * 2**20
TRIM_THRESHOLD = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
# glibc's own environment variables for these settings: a process started with them (a benchmark
# re-executed under SHARD_ENV, an operator's choice) keeps what they say
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_done = False


def keep_message_buffers() -> bool:
    """Sets glibc's mmap and trim thresholds for this process once (later calls do nothing);
    whether they are set now. False where the C library is not glibc or its environment
    variables chose already."""
    global _done
    with _lock:
        if not _done:
            _done = not any(name in os.environ for name in _ENV) and _mallopt()
        return _done


def _mallopt() -> bool:
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): its allocator as it is
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
