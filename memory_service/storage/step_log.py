"""StepLog: the learning rate of each table step a push or commit named, one entry per such step.

A table's optimizer keeps the rate each step was pushed with (a schedule is allowed) to check that
later pushes of the step agree and, for dense Adam, to catch rows up over skipped steps with the
rates those steps had. Steps need not be consecutive: sparse optimizers take a push for any step up
to MAX_STEP_AHEAD beyond the table's, so the log stores the steps named and their rates, sorted,
never a slot per step in between. A push 2**20 steps ahead costs one entry (16 bytes), as any push
does; a log of one entry per step, as it was, grew by 8 MiB per such push and was never freed.
"""
from __future__ import annotations

import math

import numpy as np


class StepLog:
    """Sorted (step, lr) entries; appending a step past the last one is amortised O(1), logging an
    earlier step that was skipped (a stale push of a sparse optimizer) copies the log once."""

    def __init__(self) -> None:
        self._steps = np.zeros(16, dtype=np.int64)  # capacity; the first `_n` are the entries
        self._lrs = np.zeros(16, dtype=np.float64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes the log holds (capacity included)."""
        return self._steps.nbytes + self._lrs.nbytes

    @property
    def last(self) -> int:
        """The largest step logged (0 when none is)."""
        return int(self._steps[self._n - 1]) if self._n else 0

    def lr_at(self, step: int) -> float:
        """The learning rate logged for `step`; nan when no push or commit named it."""
        n = self._n
        if n and step == self._steps[n - 1]:  # the common case: the table's current step
            return float(self._lrs[n - 1])
        at = int(np.searchsorted(self._steps[:n], step))
        return float(self._lrs[at]) if at < n and self._steps[at] == step else math.nan

    def lrs_of(self, steps: np.ndarray) -> np.ndarray:
        """Learning rates (k,) float64 of `steps` (k,), nan where a step is not logged."""
        steps = np.asarray(steps, dtype=np.int64)
        if not self._n:
            return np.full(len(steps), np.nan)
        known = self._steps[:self._n]
        at = np.minimum(np.searchsorted(known, steps), self._n - 1)
        return np.where(known[at] == steps, self._lrs[at], np.nan)

    def record(self, step: int, lr: float) -> None:
        """Logs `step` with `lr` (replacing the rate it had, if any: callers check first)."""
        n = self._n
        if n == 0 or step > self._steps[n - 1]:
            if n == len(self._steps):
                self._steps = np.concatenate([self._steps, np.zeros(n, np.int64)])
                self._lrs = np.concatenate([self._lrs, np.zeros(n, np.float64)])
            self._steps[n], self._lrs[n] = step, lr
            self._n += 1
            return
        at = int(np.searchsorted(self._steps[:n], step))
        if self._steps[at] == step:
            self._lrs[at] = lr
            return
        self._steps = np.insert(self._steps[:n], at, step)
        self._lrs = np.insert(self._lrs[:n], at, lr)
        self._n += 1

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps (k,) int64 increasing, lrs (k,) float64): copies of every entry."""
        return self._steps[:self._n].copy(), self._lrs[:self._n].copy()

    def load(self, steps: np.ndarray, lrs: np.ndarray) -> None:
        """Replaces the log by entries `steps` (k,) with `lrs` (k,); ValueError unless the steps are
        >= 0 and strictly increasing and the lrs finite and >= 0 (a checkpoint's log is checked
        as a push would be)."""
        steps, lrs = np.array(steps, dtype=np.int64).ravel(), np.array(lrs, dtype=np.float64).ravel()
        if len(steps) != len(lrs):
            raise ValueError(f"a step log of {len(steps)} steps and {len(lrs)} learning rates")
        if len(steps) and (steps[0] < 0 or np.any(np.diff(steps) <= 0)):
            raise ValueError("a step log's steps must be >= 0 and strictly increasing")
        if not np.all(np.isfinite(lrs) & (lrs >= 0)):
            raise ValueError("a step log's learning rates must be finite and >= 0")
        self._steps, self._lrs, self._n = steps, lrs, len(steps)
        if not len(steps):
            self.__init__()

    @classmethod
    def from_dense(cls, lrs: np.ndarray) -> "StepLog":
        """The log of a dense array of rates per step (nan: not logged), the format of checkpoints
        saved before the log was sparse."""
        lrs = np.asarray(lrs, dtype=np.float64)
        steps = np.flatnonzero(~np.isnan(lrs))
        log = cls()
        log.load(steps, lrs[steps])
        return log
