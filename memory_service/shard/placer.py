"""The background thread that places rows between a shard's tiers.

Requests never wait for a placement decision: a tier serves what it holds and the rest comes from
the tier below. Every `interval_s` the `Placer` asks each table's store to apply one plan of its
policy (`TableStore.place`: evictions with write-back, then admissions), each plan in a batch of
at most `max_moves` admissions under the shard's lock, released between batches so that requests
interleave with a long run of moves.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memory_service.storage.store import TableStore

log = logging.getLogger(__name__)
TRIM_INTERVAL_S = 1.0


def _libc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_trim()


def release_free_heap() -> None:
    """Returns free heap pages to the OS (glibc). A cold shard's requests and moves allocate
    large transient buffers (replies, LMDB reads' bytes objects) between long-lived objects; glibc
    keeps the freed pages (with shard actors' MALLOC_TRIM_THRESHOLD_, up to 4 GiB), which would
    show in RssAnon as if the table used them."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Placer:
    """Runs `place()` on the stores `stores()` lists (called under `lock`) on a daemon thread, and
    after each pass `housekeeping()`, which takes the lock itself (the shard's periodic flush)."""

    def __init__(self, lock: threading.Lock, stores: Callable[[], Iterable["TableStore"]],
                 interval_s: float = 0.1, max_moves: int = 16384,
                 housekeeping: Callable[[], None] | None = None) -> None:
        self._lock = lock
        self._stores = stores
        self._housekeeping = housekeeping
        self.interval_s, self.max_moves = interval_s, max_moves
        self.passes = 0  # completed passes over every table
        self.moves = 0  # rows moved since start
        self.error: BaseException | None = None  # what stopped the thread, if anything did
        self._stop = threading.Event()
        self._passed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="placer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread after its current batch."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def run_once(self) -> int:
        """One pass: each table's plans applied until one moves fewer than `max_moves` rows."""
        with self._lock:
            stores = list(self._stores())
        moved = 0
        for store in stores:
            while not self._stop.is_set():
                with self._lock:
                    if store.closed:
                        break
                    n = store.place(self.max_moves)
                moved += n
                if n < self.max_moves:
                    break
        self.moves += moved
        if self._housekeeping is not None and not self._stop.is_set():
            self._housekeeping()  # takes the lock as it needs (a flush: chunk by chunk)
        return moved

    def wait_passes(self, count: int, timeout: float = 30.0) -> bool:
        """Waits until `count` more passes completed; False on timeout or if the thread died."""
        with self._passed:
            target = self.passes + count
            return self._passed.wait_for(lambda: self.passes >= target or self.error is not None
                                         or not self._thread.is_alive(), timeout) and self.passes >= target

    def _run(self) -> None:
        trimmed = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
                if time.monotonic() - trimmed >= TRIM_INTERVAL_S:
                    release_free_heap()
                    trimmed = time.monotonic()
            except BaseException as err:  # noqa: BLE001 (kept for the shard to report, then stop)
                log.exception("placement stopped")
                self.error = err
                with self._passed:
                    self._passed.notify_all()
                return
            with self._passed:
                self.passes += 1
                self._passed.notify_all()
