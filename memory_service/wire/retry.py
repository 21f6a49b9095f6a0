"""Re-sending an rpc while its shard is unavailable: exponential backoff up to a deadline.

A shard is unavailable (gRPC UNAVAILABLE) while it restarts after a crash, while it shuts down on
SIGTERM, and while a connection is down; every one of these ends with the shard serving again, on
the same address, with every acknowledged change (a cold shard with a disk directory: see
memory_service/durability/journal.py). UNAVAILABLE is what a client sees both for a call in flight when the
server died ("Socket closed", "Cancelling all calls") and for calls while nothing listens
("Connection refused"). CANCELLED is re-sent too: the client never cancels its own rpcs, so it
comes from a server that stopped with the call in flight (a SIGTERM's graceful stop; seen in CI on
a CommitStep). So is RESOURCE_EXHAUSTED when the shard's admission refused the call for its bounds
on calls in flight ("overloaded:", errors.Overloaded): refused from its headers, before any state
changed, it is worth asking again once other calls ended. Every other status is the shard's answer.

Re-sending is safe for every rpc the client makes: reads change nothing (a fetch held for a step is
held again by the restarted shard, whose committed step survived), CreateTable is idempotent, and
Push and CommitStep carry a request id the shard applies once (PushRequest.request_seq).

The same backoff re-sends rows a shard refused because they moved (RowsMoved: a hot/cold migration
moved them between the client's routing and the request): `RetryPolicy.resend_moved`, with the
faster policy `RetryPolicy.for_moved_rows`, since a move is over within milliseconds.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from memory_service.errors import Overloaded, RowsMoved, ShardUnavailable

T = TypeVar("T")
M = TypeVar("M", bound=dict)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# Channel options of callers that retry: a restarted shard listens again within seconds, so
# reconnect attempts back off to at most 1 s (gRPC's default grows to 120 s, far past the restart).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000))


def retryable(err: grpc.RpcError) -> bool:
    """Whether a failed rpc is worth sending again: the shard was unavailable, or too busy."""
    return err.code() in RETRYABLE or (err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                                       and (err.details() or "").startswith(Overloaded.PREFIX))


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

    @classmethod
    def for_moved_rows(cls, deadline_s: float) -> "RetryPolicy":
        """The policy of re-sends after RowsMoved: a migration round moves rows within
        milliseconds, so the waits start at 1 ms (a restart's 50 ms would stall every fetch of
        a round) and stay under 50 ms; `deadline_s` is the client's rpc timeout."""
        return cls(deadline_s=deadline_s, initial_backoff_s=0.001, max_backoff_s=0.05)

    def backoff(self) -> "Backoff":
        """The waits of one retry loop under this policy."""
        return Backoff(self)

    def call(self, attempt: Callable[[], T], what: str, on_retry: Callable[[], None] = lambda: None) -> T:
        """attempt(), re-run while it raises a retryable grpc.RpcError; ShardUnavailable (naming
        `what`, the tries and the time) once the deadline passed. Other errors pass through."""
        backoff = self.backoff()
        while True:
            try:
                return attempt()
            except grpc.RpcError as err:
                if not retryable(err):
                    raise
                wait = backoff.next_wait()
                if wait is None:
                    raise ShardUnavailable(
                        f"{what}: unavailable for {backoff.elapsed_s:.1f} s, {backoff.tries} retries "
                        f"(retry deadline {self.deadline_s:g} s); last error: {err.code().name}: "
                        f"{err.details()}") from None
                on_retry()
                time.sleep(wait)

    def resend_moved(self, refused: M, resend: Callable[[M], M], what: str) -> None:
        """Re-sends what shards refused because its rows moved, until nothing is refused:
        `refused` is {table: what of it was refused} (empty: nothing), and `resend(refused)` sends
        those rows to their homes now and returns what was refused again. Each re-send waits this
        policy's backoff first; RowsMoved naming `what` and the tables once the deadline passed."""
        backoff = self.backoff()
        while refused:
            wait = backoff.next_wait()
            if wait is None:
                raise RowsMoved(f"{what}: rows of tables {sorted(refused)} kept moving for "
                                f"{backoff.elapsed_s:.1f} s, {backoff.tries} re-sends (deadline {self.deadline_s:g} s)")
            time.sleep(wait)
            refused = resend(refused)


class Backoff:
    """The waits of one retry loop under `policy`. Its clock starts at the first failure (the
    first `next_wait`), so the deadline bounds how long failures go on, not the whole call."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.tries = 0  # waits handed out, so re-sends
        self._first_failure: float | None = None
        self._backoff = policy.initial_backoff_s

    @property
    def elapsed_s(self) -> float:
        """Seconds since the first failure (0 before one)."""
        return 0.0 if self._first_failure is None else time.monotonic() - self._first_failure

    def next_wait(self) -> float | None:
        """Seconds to wait before the next try, after a failure now; None once the deadline
        passed. The last wait ends at the deadline, so the last try is made there."""
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        left = self.policy.deadline_s - (now - self._first_failure)
        if left <= 0:
            return None
        self.tries += 1
        wait = min(self._backoff * random.uniform(0.5, 1.0), left)
        self._backoff = min(self._backoff * self.policy.multiplier, self.policy.max_backoff_s)
        return wait
