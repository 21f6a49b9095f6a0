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

from memory_service.native import kernels
from memory_service.storage.catch_up import (MAX_MOVEMENT, AdamDecay, CatchUpStats, catch_up, catch_up_state,
                                             moment_ratio)
from memory_service.storage.step_log import StepLog
from memory_service.config import OptimizerConfig, TableConfig


# The furthest a push or commit may step beyond the table's step (INVALID_ARGUMENT beyond). The
# step log keeps the steps named, not a slot per step (step_log.py), so a jump costs what any push
# costs; the bound keeps steps far from int64's end, where step + 1 would overflow.
MAX_STEP_AHEAD = 1 << 20


def _native(rows: np.ndarray, state: np.ndarray, grads: np.ndarray) -> bool:
    """Whether the compiled step runs (else the numpy reference): on, and arrays it can take
    (float32 gradients: numpy would promote others, and the kernels compute in float32)."""
    return kernels.active() and kernels.takes(rows, state) and grads.dtype == np.float32 \
        and grads.shape == rows.shape


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
    """Updates n distinct rows in place from their (already duplicate-summed) gradients.

    It also keeps the table's step log: the learning rate each step was pushed with (a schedule
    is allowed), so every update, and dense Adam's catch-up over skipped steps, uses the rate the
    step actually had.
    """

    catches_up = False  # True: rows must be brought up to date before they are read or updated

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config
        self.step = 0  # the largest step recorded
        self.log = StepLog()  # the learning rate of each step a push or commit named

    @abstractmethod
    def state_width(self, width: int) -> int:
        """float32 state values kept per row of `width` values."""

    def initial_state(self, n: int, width: int) -> np.ndarray:
        """State of n rows never updated: (n, state_width) float32."""
        return np.zeros((n, self.state_width(width)), dtype=np.float32)

    @abstractmethod
    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int,
              lr: float | None = None) -> None:
        """rows: (n, w) f32, state: (n, s) f32, grads: (n, w) f32; `step` >= 1 is the table step,
        `lr` its learning rate (None: the configured one)."""

    def checked_lr(self, step: int, lr: float | None) -> float:
        """The learning rate of a push for `step` (None: the configured lr; 0: a zero step), or ValueError if
        the push cannot be applied: a different lr than the step already has, or, for optimizers
        that catch up, a step other than the current or the next one (the step log has no holes)."""
        if step > self.step + MAX_STEP_AHEAD:
            raise ValueError(f"step {step} is more than {MAX_STEP_AHEAD} steps beyond the table's step "
                             f"{self.step} (the step log keeps a learning rate per step)")
        lr = self.config.lr if lr is None else float(lr)
        # lr 0 is a step all the same, as torch takes it (a schedule that ends at 0): rows keep
        # their values, the optimizer state (moments, sums, the step) moves as under any lr
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"learning rate {lr} of step {step} must be finite and >= 0")
        if not math.isnan(known := self.log.lr_at(step)) and known != lr:
            raise ValueError(f"step {step} was pushed with learning rate {known!r}, not {lr!r}")
        if self.catches_up and step not in (self.step, self.step + 1):
            raise ValueError(f"table is at step {self.step}: a {self.config.kind} table takes pushes "
                             f"for step {self.step} or {self.step + 1} only (every step, in order)")
        return lr

    def record_step(self, step: int, lr: float | None) -> None:
        """Logs `step` with its learning rate (checked_lr first)."""
        lr = self.checked_lr(step, lr)
        self.log.record(step, lr)
        self.step = max(self.step, step)

    def lr_at(self, step: int) -> float:
        """The learning rate of `step` (nan: no push or commit named it)."""
        return self.log.lr_at(step)

    def catch_up(self, rows: np.ndarray, state: np.ndarray, last: np.ndarray, target: int) -> None:
        """Brings rows last updated at steps `last` (n,) up to step `target` (n, ...) in place.
        Nothing to do for optimizers whose rows move only when they have a gradient."""

    def catch_up_at(self, rows: np.ndarray, state: np.ndarray, last: np.ndarray, at: np.ndarray,
                    target: int) -> bool:
        """`catch_up` of the distinct rows `at` (k,) of arenas rows, state, last, in place (no
        gather, no scatter), where the compiled loops can; False (nothing done) elsewhere."""
        return False

    def update(self, rows: np.ndarray, state: np.ndarray, last: np.ndarray, grads: np.ndarray,
               step: int, lr: float | None = None) -> None:
        """Catch-up to step - 1, then the step's update with learning rate `lr` (`checked_lr`'s:
        the step need not be logged yet, so an update can be computed, checked and only then
        stored; None: the rate logged for `step`); `last` (n,) becomes `step`. Gathered copies."""
        self.catch_up(rows, state, last, step - 1)
        self.apply(rows, state, grads, step, self.lr_at(step) if lr is None else lr)
        last[:] = step

    def log_state(self) -> dict[str, np.ndarray]:
        """The step log, for checkpoints: the table's step, and the steps logged (k,) int64 with
        their learning rates (k,) float64."""
        steps, lrs = self.log.entries()
        return {"step": np.int64(self.step), "steps": steps, "lrs": lrs}

    def load_log_state(self, log: dict[str, np.ndarray]) -> None:
        """Takes a `log_state()`; one without "steps" is the dense form older checkpoints saved
        (a rate per step 0..step, nan where none was pushed). ValueError for a log that is not one."""
        if "steps" in log:
            self.log = StepLog()
            self.log.load(log["steps"], log["lrs"])
        else:
            self.log = StepLog.from_dense(log["lrs"])
        self.step = int(log["step"])
        if self.log.last > self.step:
            raise ValueError(f"a step log with step {self.log.last} for a table at step {self.step}")


class SparseAdam(TableOptimizer):
    """torch.optim.SparseAdam. State per row: [exp_avg (w), exp_avg_sq (w)]."""

    def state_width(self, width: int) -> int:
        return 2 * width

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int,
              lr: float | None = None) -> None:
        c, w = self.config, rows.shape[1]
        lr = c.lr if lr is None else lr
        if _native(rows, state, grads):  # the same float32 steps, fused per row
            step_size = lr * math.sqrt(1 - c.beta2**step) / (1 - c.beta1**step)
            kernels.sparse_adam(rows, state, grads, np.float32(1 - c.beta1), np.float32(1 - c.beta2),
                                np.float32(c.eps), np.float32(-step_size))
            return
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
        step_size = lr * math.sqrt(1 - c.beta2**step) / (1 - c.beta1**step)
        ratio = np.divide(exp_avg, denom, out=avg_update)
        ratio *= np.float32(-step_size)
        rows += ratio


class Adagrad(TableOptimizer):
    """torch.optim.Adagrad on sparse gradients (lr_decay 0). State per row: state_sum (w)."""

    def state_width(self, width: int) -> int:
        return width

    def initial_state(self, n: int, width: int) -> np.ndarray:
        return np.full((n, width), self.config.initial_accumulator_value, dtype=np.float32)

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int,
              lr: float | None = None) -> None:
        if _native(rows, state, grads):
            kernels.adagrad(rows, state, grads, -(self.config.lr if lr is None else lr), self.config.eps)
            return
        state += grads * grads
        std = np.sqrt(state)  # (n, w)
        std += np.float32(self.config.eps)
        _fused_add(rows, -(self.config.lr if lr is None else lr), np.divide(grads, std, out=std))


class SGD(TableOptimizer):
    """torch.optim.SGD without momentum: rows -= lr * grads. No state."""

    def state_width(self, width: int) -> int:
        return 0

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int,
              lr: float | None = None) -> None:
        if _native(rows, state, grads):
            kernels.sgd(rows, grads, -(self.config.lr if lr is None else lr))
            return
        _fused_add(rows, -(self.config.lr if lr is None else lr), grads)


class Adam(TableOptimizer):
    """torch.optim.Adam applied to the whole dense table, at the cost of sparse updates.

    Under dense Adam a row keeps moving after its last gradient (its momentum decays over the
    following steps). Here a row moves only when it is read or written: it is first caught up
    over the steps it skipped (memory_service/storage/catch_up.py, closed form, vectorised over rows),
    then, for a write, given torch's Adam step in torch's float32 order of operations. State per
    row: [exp_avg (w), exp_avg_sq (w)]; the step each row was last brought up to date is kept by
    the row's owner (the store), next to the state.
    """

    catches_up = True

    def __init__(self, config: OptimizerConfig) -> None:
        super().__init__(config)
        self.decay = AdamDecay.of(config.beta1, config.beta2, config.eps)
        self.stats = CatchUpStats()
        self._ss = np.zeros(1)  # (step + 1,) float32-rounded lr_j / (1 - beta1^j)
        self._bsq = np.ones(1)  # (step + 1,) float32-rounded sqrt(1 - beta2^j)
        self._ss_sum = 0.0  # sum of _ss: bounds how far any row can ever move (see checked_lr)

    def checked_lr(self, step: int, lr: float | None) -> float:
        """As TableOptimizer's, and for a new step: ValueError if its rate could carry a row past
        float32's range. A row moves, per step j it is updated or caught up over, by at most
        ss_j = lr_j / (1 - beta1^j) times |m| / sqrt(v) <= moment_ratio (catch_up.py's bound,
        for beta1^2 < beta2): the sum of ss_j over every step times it stays below MAX_MOVEMENT,
        a quarter of float32's largest value. A push's own rows are checked after the update
        (TableStore.prepare_update); this covers the rows a step's rate moves later, in a catch-up
        on read, which cannot be refused. Far from any real schedule (~1e37 in all)."""
        lr = super().checked_lr(step, lr)
        ratio = moment_ratio(self.decay)
        if step > self.step and ratio is not None:
            total = self._ss_sum + lr / (1 - self.config.beta1**step)
            if not total * ratio <= MAX_MOVEMENT:
                raise ValueError(f"learning rate {lr:g} of step {step} could carry a row past float32's range "
                                 f"when it is caught up over that step (the sum of lr_j / (1 - beta1^j) over "
                                 f"every step of an adam table must stay below {MAX_MOVEMENT / ratio:.3g})")
        return lr

    def state_width(self, width: int) -> int:
        return 2 * width

    def record_step(self, step: int, lr: float | None) -> None:
        super().record_step(step, lr)
        self._extend_factors()

    def _extend_factors(self) -> None:
        """Per-step factors of the steps logged since: dense Adam takes every step in order, so
        these cost 16 bytes per step the table took, never more than its pushes named."""
        if len(self._ss) <= self.step:
            j = np.arange(len(self._ss), self.step + 1)
            c = self.config
            ss = self.log.lrs_of(j) / (1 - c.beta1 ** j.astype(np.float64))
            bsq = np.sqrt(1 - c.beta2 ** j.astype(np.float64))
            self._ss = np.concatenate([self._ss, ss.astype(np.float32).astype(np.float64)])
            self._bsq = np.concatenate([self._bsq, bsq.astype(np.float32).astype(np.float64)])
            self._ss_sum += float(np.nansum(ss))

    def load_log_state(self, log: dict[str, np.ndarray]) -> None:
        super().load_log_state(log)
        steps, _ = self.log.entries()
        if not np.array_equal(steps, np.arange(1, self.step + 1)):
            raise ValueError(f"an adam table's step log must hold every step 1..{self.step}")
        self._ss, self._bsq, self._ss_sum = np.zeros(1), np.ones(1), 0.0
        self._extend_factors()

    def catch_up(self, rows: np.ndarray, state: np.ndarray, last: np.ndarray, target: int) -> None:
        w = rows.shape[1]
        if kernels.active() and kernels.takes(rows, state):  # no copies of the halves: kernels read state rows
            catch_up_state(rows, state, last, target, self._ss[: target + 1], self._bsq[: target + 1],
                           self.decay, self.stats)
            return
        m, v = state[:, :w].copy(), state[:, w:].copy()  # numpy runs on contiguous halves
        catch_up(rows, m, v, last, target, self._ss[: target + 1], self._bsq[: target + 1],
                 self.decay, self.stats)
        state[:, :w], state[:, w:] = m, v

    def catch_up_at(self, rows: np.ndarray, state: np.ndarray, last: np.ndarray, at: np.ndarray,
                    target: int) -> bool:
        if not (kernels.active() and kernels.takes(rows, state) and last.dtype == np.int64):
            return False
        catch_up_state(rows, state, last, target, self._ss[: target + 1], self._bsq[: target + 1],
                       self.decay, self.stats, at)
        return True

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int,
              lr: float | None = None) -> None:
        c, w = self.config, rows.shape[1]
        lr = c.lr if lr is None else lr
        # exp_avg.lerp_(grad, 1 - beta1): one rounding of m + weight * (grad - m) (an FMA)
        weight = np.float32(1 - c.beta1)
        if _native(rows, state, grads):  # the steps below, fused per row
            kernels.adam(rows, state, grads, float(weight), float(np.float64(1 - weight)), np.float32(c.beta2),
                         np.float32(1 - c.beta2), np.float32(math.sqrt(1 - c.beta2**step)), np.float32(c.eps),
                         np.float32(-lr / (1 - c.beta1**step)))
            return
        m, v = state[:, :w].copy(), state[:, w:].copy()  # (n, w) each
        if weight < 0.5:
            m = (m + np.float64(weight) * (grads - m)).astype(np.float32)
        else:
            m = (grads - np.float64(1 - weight) * (grads - m)).astype(np.float32)
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        v *= np.float32(c.beta2)
        v += np.float32(1 - c.beta2) * grads * grads
        # denom = sqrt(v) / sqrt(1 - beta2^t) + eps;  param.addcdiv_(m, denom, value=-lr / (1 - beta1^t))
        denom = np.sqrt(v) / np.float32(math.sqrt(1 - c.beta2**step))
        denom += np.float32(c.eps)
        rows += np.float32(-lr / (1 - c.beta1**step)) * m / denom
        state[:, :w], state[:, w:] = m, v


class Frozen(TableOptimizer):
    """A frozen table's: no state, no updates. The shard refuses pushes and commits of a frozen
    table before they reach the store (FAILED_PRECONDITION); this refuses any that would."""

    def state_width(self, width: int) -> int:
        return 0

    def checked_lr(self, step: int, lr: float | None) -> float:
        raise ValueError(f"the table is frozen: it takes no step (step {step} refused)")

    def apply(self, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int,
              lr: float | None = None) -> None:
        raise ValueError("the table is frozen: it takes no update")


_KINDS: dict[str, type[TableOptimizer]] = {"sparse_adam": SparseAdam, "adam": Adam,
                                           "adagrad": Adagrad, "sgd": SGD}


def make_optimizer(cfg: OptimizerConfig) -> TableOptimizer:
    """The optimizer of kind `cfg.kind` (config.OPTIMIZERS lists them)."""
    return _KINDS[cfg.kind](cfg)


def optimizer_of(cfg: TableConfig) -> TableOptimizer:
    """Table `cfg`'s optimizer: Frozen for a frozen table (which keeps its optimizer config only
    as a record of how it was trained), else `make_optimizer(cfg.optimizer)`."""
    return Frozen(cfg.optimizer) if cfg.frozen else make_optimizer(cfg.optimizer)
