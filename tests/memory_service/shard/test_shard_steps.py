"""Shard: fetches held until a table step (the trainer's exact mode) and K workers' parts of one
step summed and applied once (data-parallel training)."""
import threading
import time

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import InvalidArgument, StepNotReached
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

ADAM = OptimizerConfig("adam", lr=0.05, beta1=0.9, beta2=0.95, eps=1e-8)


def make_shard(optimizer=ADAM) -> Shard:
    shard = Shard(0, 1)
    shard.create_table(TableConfig("x", 50, 4, init_scale=0.5, seed=3, optimizer=optimizer))
    return shard


def grads(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 4), value, np.float32)


def test_fetch_waits_for_its_step_and_sees_that_push():
    shard = make_shard()
    ids = np.array([1, 2])
    got = {}
    reader = threading.Thread(target=lambda: got.update(shard.fetch({"x": ids}, min_step=1, timeout=30)))
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive()  # held: no push yet
    before = shard.fetch({"x": ids})["x"]
    shard.push("c", {"x": TablePush(1, ids, grads(2))})
    reader.join(10)
    assert not reader.is_alive()
    after = shard.fetch({"x": ids})["x"]
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(got["x"], after)  # the held fetch saw step 1


def test_fetch_for_a_step_never_pushed_times_out_without_changing_anything():
    shard = make_shard()
    digest = shard.digest()
    with pytest.raises(StepNotReached, match="step 3"):
        shard.fetch({"x": np.array([1])}, min_step=3, timeout=0.2)
    assert shard.digest() == digest


def test_fetch_of_a_reached_step_does_not_wait():
    shard = make_shard()
    shard.push("c", {"x": TablePush(1, np.array([1]), grads(1))})
    start = time.perf_counter()
    shard.fetch({"x": np.array([1])}, min_step=1, timeout=30)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("kind", ["adam", "sparse_adam"])
def test_k_parts_are_summed_and_applied_once(kind):
    """Two workers' parts of each step equal one push of their sum, over three steps."""
    opt = OptimizerConfig(kind, lr=0.05, beta1=0.9, beta2=0.95, eps=1e-8)
    parts, whole = make_shard(opt), make_shard(opt)
    rng = np.random.default_rng(0)
    for step in (1, 2, 3):
        a_ids, b_ids = rng.integers(0, 50, 6), rng.integers(0, 50, 6)
        a, b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
        assert parts.push("w0", {"x": TablePush(step, a_ids, a, lr=0.01 * step)}, contributors=2) == 0
        assert parts.describe_table("x").step == step - 1  # held, not applied
        assert parts.push("w1", {"x": TablePush(step, b_ids, b, lr=0.01 * step)}, contributors=2) > 0
        whole.push("one", {"x": TablePush(step, np.r_[a_ids, b_ids], np.r_[a, b], lr=0.01 * step)})
    everything = np.arange(50)
    np.testing.assert_allclose(parts.fetch({"x": everything})["x"], whole.fetch({"x": everything})["x"],
                               rtol=1e-6, atol=1e-7)
    assert parts.describe_table("x").step == 3


def test_k_parts_reject_a_second_part_a_different_k_or_lr():
    shard = make_shard()
    ids = np.array([1])
    shard.push("w0", {"x": TablePush(1, ids, grads(1), lr=0.1)}, contributors=3)
    digest = shard.digest()
    with pytest.raises(InvalidArgument, match="already sent its part"):
        shard.push("w0", {"x": TablePush(1, ids, grads(1), lr=0.1)}, contributors=3)
    with pytest.raises(InvalidArgument, match="contributors"):
        shard.push("w1", {"x": TablePush(1, ids, grads(1), lr=0.1)}, contributors=2)
    with pytest.raises(InvalidArgument, match="lr"):
        shard.push("w1", {"x": TablePush(1, ids, grads(1), lr=0.2)}, contributors=3)
    with pytest.raises(InvalidArgument, match="contributors 0"):
        shard.push("w1", {"x": TablePush(1, ids, grads(1), lr=0.1)}, contributors=0)
    assert shard.digest() == digest
    shard.push("w1", {"x": TablePush(1, ids, grads(1), lr=0.1)}, contributors=3)
    shard.push("w2", {"x": TablePush(1, np.array([], np.int64), np.zeros((0, 4), np.float32), lr=0.1)},
               contributors=3)  # a worker with no rows here still sends its (empty) part
    assert shard.describe_table("x").step == 1
