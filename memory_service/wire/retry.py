"""Re-sending an rpc while its shard is unavailable: exponential backoff up to a deadline.

A shard is unavailable (gRPC UNAVAILABLE) while it restarts after a crash, while it shuts down on
SIGTERM, and while a connection is down; every one of these ends with the shard serving again, on
the same address, with every acknowledged change (a cold shard with a disk directory: see
memory_service/durability/journal.py). UNAVAILABLE is what a client sees both for a call in flight when the
server died ("Socket closed", "Cancelling all calls") and for calls while nothing listens
("Connection refused"). CANCELLED is re-sent too: the client never cancels its own rpcs, so it
comes from a server that stopped with the call in flight (a SIGTERM's graceful stop; seen in CI on
a CommitStep). Every other status is the shard's answer.

Re-sending is safe for every rpc the client makes: reads change nothing (a fetch held for a step is
held again by the restarted shard, whose committed step survived), CreateTable is idempotent, and
Push and CommitStep carry a request id the shard applies once (PushRequest.request_seq).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from memory_service.errors import ShardUnavailable

T = TypeVar("T")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# Channel options of callers that retry: a restarted shard listens again within seconds, so
# reconnect attempts back off to at most 1 s (gRPC's default grows to 120 s, far past the restart).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000))


@dataclass(frozen=True)
class RetryPolicy:
    """Waits `initial_backoff_s`, then `multiplier` times longer each time up to `max_backoff_s`
    (each wait drawn uniformly from [1/2, 1] of that, so clients of one restarted shard do not
    come back in step), for at most `deadline_s` after the first failure; `deadline_s` 0 never
    retries."""

    deadline_s: float = 120.0  # a restart takes seconds (new process, LMDB open, log replay)
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.deadline_s < 0 or not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(f"retry deadline_s {self.deadline_s} must be >= 0 and 0 < initial_backoff_s "
                             f"{self.initial_backoff_s} <= max_backoff_s {self.max_backoff_s}")
        if self.multiplier < 1:
            raise ValueError(f"retry multiplier {self.multiplier} must be >= 1")

    def call(self, attempt: Callable[[], T], what: str, on_retry: Callable[[], None] = lambda: None) -> T:
        """attempt(), re-run while it raises a retryable grpc.RpcError; ShardUnavailable (naming
        `what`, the tries and the time) once the deadline passed. Other errors pass through."""
        first_failure, tries, backoff = None, 0, self.initial_backoff_s
        while True:
            try:
                return attempt()
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                left = self.deadline_s - (now - first_failure)
                if left <= 0:
                    raise ShardUnavailable(
                        f"{what}: unavailable for {now - first_failure:.1f} s, {tries} retries "
                        f"(retry deadline {self.deadline_s:g} s); last error: {err.code().name}: "
                        f"{err.details()}") from None
                tries += 1
                on_retry()
                time.sleep(min(backoff * random.uniform(0.5, 1.0), left))  # the last try at the deadline
                backoff = min(backoff * self.multiplier, self.max_backoff_s)
