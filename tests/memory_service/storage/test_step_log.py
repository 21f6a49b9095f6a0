"""StepLog: one entry per step a push or commit named, sorted, whatever the gaps; and the dense
form older checkpoints saved, still read."""
from __future__ import annotations

import math

import numpy as np
import pytest

from memory_service.config import OptimizerConfig
from memory_service.storage.optimizer import make_optimizer
from memory_service.storage.step_log import StepLog


def test_steps_far_apart_and_out_of_order_cost_an_entry_each():
    log = StepLog()
    for step, lr in [(1, 0.1), (1 << 20, 0.2), (2 << 20, 0.3), (5, 0.4), (3, 0.5), (2 << 20, 0.3)]:
        log.record(step, lr)
    steps, lrs = log.entries()
    assert steps.tolist() == [1, 3, 5, 1 << 20, 2 << 20] and lrs.tolist() == [0.1, 0.5, 0.4, 0.2, 0.3]
    assert log.last == 2 << 20 and log.nbytes < 1024
    assert log.lr_at(5) == 0.4 and math.isnan(log.lr_at(4)) and math.isnan(log.lr_at(3 << 20))
    np.testing.assert_array_equal(log.lrs_of(np.array([0, 1, 2, 3, 1 << 20])), [np.nan, 0.1, np.nan, 0.5, 0.2])
    assert np.isnan(StepLog().lrs_of(np.array([1, 2]))).all()


def test_a_dense_log_of_an_older_checkpoint_loads_as_the_same_steps():
    for kind in ("sparse_adam", "adam"):
        opt = make_optimizer(OptimizerConfig(kind=kind))
        opt.load_log_state({"step": np.int64(3), "lrs": np.array([np.nan, 0.1, 0.2, 0.3])})
        assert opt.step == 3 and opt.log_state()["steps"].tolist() == [1, 2, 3]
        assert opt.log_state()["lrs"].tolist() == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("log, match", [
    ({"step": np.int64(2), "steps": np.array([2, 1]), "lrs": np.array([0.1, 0.1])}, "strictly increasing"),
    ({"step": np.int64(2), "steps": np.array([1, 2]), "lrs": np.array([0.1, np.inf])}, "finite"),
    ({"step": np.int64(1), "steps": np.array([1, 2]), "lrs": np.array([0.1, 0.1])}, "for a table at step 1"),
])
def test_a_log_that_is_not_one_is_refused(log, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(OptimizerConfig()).load_log_state(log)


def test_an_adam_log_must_hold_every_step():
    with pytest.raises(ValueError, match="every step 1..3"):
        make_optimizer(OptimizerConfig(kind="adam")).load_log_state(
            {"step": np.int64(3), "steps": np.array([1, 3]), "lrs": np.array([0.1, 0.1])})
