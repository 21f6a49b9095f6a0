"""MoveGate: lets a checkpoint hold a hot shard's migration still while every shard saves.

A migration round moves rows between shards: a promoted row is exported by its cold shard and
imported by the hot shard a moment later. A checkpoint that saved the cold shard after the export
and the hot shard before the import would hold the row in neither file; one that saved a row's old
home before a move and its new home after would hold it twice. So the checkpoint pauses migration
on every hot shard first (`pause` returns once the round in progress has ended), saves, and
resumes. The migrator asks the gate before each round (`round()`) and skips the round while the
gate is paused: it never blocks, so stopping a paused migrator stays prompt.

A pause is a lease: it lapses after `lease_s` seconds, so a driver that died mid-save does not
stop migration forever. `resume` says whether the pause held throughout (no round ran since it
began): a save that outlived its lease is then refused instead of trusted.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from memory_service.errors import FailedPrecondition


class MoveGate:
    """Whether a hot shard's migrator may run a round now (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._moving = False  # a round is in progress
        self._paused_until = 0.0  # time.monotonic() the current pause lapses at; 0: not paused
        self._rounds = 0  # rounds started since the gate was made
        self._rounds_at_pause = 0

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._is_paused()

    def _is_paused(self) -> bool:
        return time.monotonic() < self._paused_until

    @contextmanager
    def round(self) -> Iterator[bool]:
        """The migrator's round: yields False (run nothing) while paused, else True with the
        round marked in progress until the block ends."""
        with self._cond:
            if self._is_paused():
                yield False
                return
            self._moving = True
            self._rounds += 1
        try:
            yield True
        finally:
            with self._cond:
                self._moving = False
                self._cond.notify_all()

    def pause(self, lease_s: float, timeout_s: float) -> None:
        """Stops new rounds for `lease_s` seconds (renewing a pause in force) and waits for the
        round in progress to end: FailedPrecondition if it has not after `timeout_s`."""
        if not lease_s > 0 or timeout_s < 0:
            raise ValueError(f"pause lease {lease_s} s must be > 0 and timeout {timeout_s} s >= 0")
        with self._cond:
            if not self._is_paused():
                self._rounds_at_pause = self._rounds
            self._paused_until = time.monotonic() + lease_s
            if not self._cond.wait_for(lambda: not self._moving, timeout_s):
                raise FailedPrecondition(f"a migration round is still moving rows after {timeout_s:.1f} s; "
                                         f"try the checkpoint again")

    def resume(self) -> bool:
        """Ends the pause; returns whether it held throughout (no round began since `pause`)."""
        with self._cond:
            held = self._rounds == self._rounds_at_pause  # a lapsed lease with no round since is fine
            self._paused_until = 0.0
            self._rounds_at_pause = self._rounds
            return held
