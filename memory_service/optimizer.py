"""Server-side sparse optimizers: the update a shard applies to the rows a push names.

Each optimizer reproduces its torch counterpart on a sparse embedding gradient, in float32 and in
torch's order of operations so rounding matches: torch.optim.SparseAdam (lazy Adam: only pushed
rows and their moments move; the bias correction uses the table's step counter carried by the
push, never a per-row count), torch.optim.Adagrad's sparse path (lr_decay 0, no weight decay) and
plain torch.optim.SGD. Torch casts Python-float hyperparameters to float32 before multiplying a
float32 tensor; so do we (np.float32(...)), with the bias-corrected step size computed in float64
first exactly as torch's `math.sqrt(...)` does. Torch's `p.add_(v, alpha=a)` is a fused
multiply-add (one rounding), reproduced by `_fused_add`. What stays: torch's vectorised CPU sqrt
differs by one ulp from IEEE sqrt (numpy's) in ~20% of elements (torch 2.13, AVX2), so Adam and
Adagrad rows agree with torch to about 1e-7 relative, not bit for bit; SGD on distinct ids is
bit-exact. (Duplicate ids add another ulp: torch's SGD adds them one by one, we sum first.)

State lives beside each row as `state_width(width)` float32 values, so the store can keep it in
one arena and gather/scatter it with the rows.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from memory_service.config import OptimizerConfig


def _fused_add(rows: np.ndarray, alpha: float, values: np.ndarray) -> None:
    """rows += float32(alpha) * values with one rounding, as torch's add_(alpha=) (an FMA).

    The float32 product is exact in float64, so only the sum rounds (twice, float64 then float32,
    which differs from one rounding only on exact float32 ties). rows, values: (n, w) float32.
    """
    exact = values.astype(np.float64)  # (n, w)
    exact *= np.float64(np.float32(alpha))
    exact += rows
    rows[...] = exact


class TableOptimizer(ABC):
    """Updates n distinct rows in place from their (already duplicate-summed) gradients."""

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config

    @abstractmethod
    def state_width(self, width: int) -> int:
        """float32 state values kept per row of `width` values."""

    def initial_state(self, n: int, width: int) -> np.ndarray:
        """State of n rows never updated: (n, state_width) float32."""
        return np.zeros((n, self.state_width(width)), dtype=np.float32)

    @abstractmethod
    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        """rows: (n, w) f32, state: (n, s) f32, grads: (n, w) f32; `step` >= 1 is the table step."""


class SparseAdam(TableOptimizer):
    """torch.optim.SparseAdam. State per row: [exp_avg (w), exp_avg_sq (w)]."""

    def state_width(self, width: int) -> int:
        return 2 * width

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        c, w = self.config, rows.shape[1]
        # Contiguous copies of the two halves: numpy runs an (n, w) op on a strided half as n
        # short loops, which made a 16k x 64 update 2x slower than copy + contiguous ops.
        exp_avg, exp_avg_sq = state[:, :w].copy(), state[:, w:].copy()  # (n, w) each
        # torch: old += (new - old) * (1 - b), keeping the update values for numer and denom.
        avg_update = np.subtract(grads, exp_avg)  # (n, w)
        avg_update *= np.float32(1 - c.beta1)
        sq_update = np.multiply(grads, grads)  # (n, w)
        sq_update -= exp_avg_sq
        sq_update *= np.float32(1 - c.beta2)
        exp_avg += avg_update
        exp_avg_sq += sq_update
        state[:, :w], state[:, w:] = exp_avg, exp_avg_sq
        denom = np.sqrt(exp_avg_sq, out=sq_update)
        denom += np.float32(c.eps)
        step_size = c.lr * math.sqrt(1 - c.beta2**step) / (1 - c.beta1**step)
        ratio = np.divide(exp_avg, denom, out=avg_update)
        ratio *= np.float32(-step_size)
        rows += ratio


class Adagrad(TableOptimizer):
    """torch.optim.Adagrad on sparse gradients (lr_decay 0). State per row: state_sum (w)."""

    def state_width(self, width: int) -> int:
        return width

    def initial_state(self, n: int, width: int) -> np.ndarray:
        return np.full((n, width), self.config.initial_accumulator_value, dtype=np.float32)

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        state += grads * grads
        std = np.sqrt(state)  # (n, w)
        std += np.float32(self.config.eps)
        _fused_add(rows, -self.config.lr, np.divide(grads, std, out=std))


class SGD(TableOptimizer):
    """torch.optim.SGD without momentum: rows -= lr * grads. No state."""

    def state_width(self, width: int) -> int:
        return 0

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        _fused_add(rows, -self.config.lr, grads)


_KINDS: dict[str, type[TableOptimizer]] = {"sparse_adam": SparseAdam, "adagrad": Adagrad,
                                           "sgd": SGD}


def make_optimizer(cfg: OptimizerConfig) -> TableOptimizer:
    """The optimizer of kind `cfg.kind` (config.OPTIMIZERS lists them)."""
    return _KINDS[cfg.kind](cfg)
