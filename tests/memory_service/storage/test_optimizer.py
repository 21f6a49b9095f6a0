"""Server-side optimizers equal their torch counterparts on a sparse embedding.

20 steps of gradients with duplicate ids go once through torch (nn.Embedding(sparse=True), whose
backward emits one gradient row per occurrence and whose optimizer coalesces them) and once
through TableStore with the duplicates summed first, as the shard does; rows must agree within
1e-6 relative to the table's scale (max |row value|): an element near zero has no meaningful
relative error. Differences left are one-ulp: torch's vectorised sqrt and its summation order of
duplicates (see memory_service/storage/optimizer.py).
"""
import numpy as np
import pytest
import torch

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.storage.optimizer import SGD, Adagrad, SparseAdam, make_optimizer
from memory_service.rows import init_rows
from memory_service.storage.store import TableStore

NUM_ROWS, WIDTH, STEPS = 40, 8, 20
OPTIMIZERS = {
    "sparse_adam": OptimizerConfig("sparse_adam", lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6),
    "adagrad": OptimizerConfig("adagrad", lr=0.1, eps=1e-7, initial_accumulator_value=0.1),
    "sgd": OptimizerConfig("sgd", lr=0.1),
}


def torch_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.kind == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.kind == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps,
                                   initial_accumulator_value=cfg.initial_accumulator_value)
    return torch.optim.SGD(params, lr=cfg.lr)


def gradient_steps(seed: int = 0):
    """STEPS batches of (ids (24,) with repeats, grads (24, WIDTH) float32)."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        ids = rng.integers(0, NUM_ROWS, size=24)  # 24 draws of 40 rows: duplicates every step
        yield ids, rng.standard_normal((len(ids), WIDTH)).astype(np.float32)


def torch_rows(cfg: TableConfig, steps) -> np.ndarray:
    """The table (num_rows, width) after torch applies `steps` to an embedding at init_rows."""
    emb = torch.nn.Embedding(cfg.num_rows, cfg.width, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(init_rows(cfg.seed, np.arange(cfg.num_rows), cfg.width,
                                                    cfg.init_scale)))
    opt = torch_optimizer(cfg.optimizer, emb.parameters())
    for ids, grads in steps:
        opt.zero_grad()
        emb(torch.from_numpy(ids)).backward(torch.from_numpy(grads))  # one grad row per occurrence
        opt.step()
    return emb.weight.detach().numpy()


def assert_rows_close(ours: np.ndarray, ref: np.ndarray, start: np.ndarray) -> None:
    assert not np.allclose(ref, start, atol=1e-3)  # the steps really moved the rows
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_store_matches_torch(kind):
    cfg = TableConfig("t", NUM_ROWS, WIDTH, init_scale=0.5, seed=3, optimizer=OPTIMIZERS[kind])
    store = TableStore(cfg)
    for step, (ids, grads) in enumerate(gradient_steps(), start=1):
        distinct, inverse = np.unique(ids, return_inverse=True)
        summed = np.zeros((len(distinct), WIDTH), dtype=np.float32)
        np.add.at(summed, inverse, grads)
        store.update(distinct, summed, step)
    all_ids = np.arange(NUM_ROWS)
    start = init_rows(cfg.seed, all_ids, WIDTH, cfg.init_scale)
    assert_rows_close(store.read(all_ids), torch_rows(cfg, gradient_steps()), start)


def test_state_layout():
    assert SparseAdam(OPTIMIZERS["sparse_adam"]).state_width(8) == 16  # [exp_avg, exp_avg_sq]
    assert Adagrad(OPTIMIZERS["adagrad"]).state_width(8) == 8  # [state_sum]
    assert SGD(OPTIMIZERS["sgd"]).state_width(8) == 0
    np.testing.assert_array_equal(make_optimizer(OPTIMIZERS["adagrad"]).initial_state(2, 3),
                                  np.full((2, 3), 0.1, dtype=np.float32))
    state = make_optimizer(OPTIMIZERS["sparse_adam"]).initial_state(2, 3)
    assert state.shape == (2, 6) and state.dtype == np.float32 and not state.any()
    assert isinstance(make_optimizer(OptimizerConfig("sgd")), SGD)


def test_sgd_on_distinct_rows_is_bit_exact_with_torch():
    """torch's add_(alpha=) is a fused multiply-add; _fused_add rounds the same way."""
    rng = np.random.default_rng(1)
    rows, grads = rng.standard_normal((2, 64, 16)).astype(np.float32)
    ref = torch.from_numpy(rows.copy()).add_(torch.from_numpy(grads), alpha=-0.1).numpy()
    SGD(OptimizerConfig("sgd", lr=0.1)).apply(rows, np.zeros((64, 0), np.float32), grads, 1)
    np.testing.assert_array_equal(rows, ref)


def test_adam_bias_correction_uses_table_step_not_row_count():
    """A row first pushed at table step 10 is corrected with 10, as SparseAdam's shared step."""
    cfg = OPTIMIZERS["sparse_adam"]
    rows, state = np.zeros((1, 2), np.float32), np.zeros((1, 4), np.float32)
    SparseAdam(cfg).apply(rows, state, np.ones((1, 2), np.float32), step=10)
    step_size = cfg.lr * np.sqrt(1 - cfg.beta2**10) / (1 - cfg.beta1**10)
    m, v = 1 - cfg.beta1, 1 - cfg.beta2
    np.testing.assert_allclose(rows, -step_size * m / (np.sqrt(v) + cfg.eps), rtol=1e-6)


# -- lr 0: a zero step, as torch takes it ------------------------------------------------------------
ZERO_STEP_LRS = [0.05, 0.0, 0.02, 0.0, 0.0, 0.03]  # a schedule touching 0 twice, then going on


def torch_state(kind: str, opt: torch.optim.Optimizer, weight: torch.Tensor) -> np.ndarray:
    """torch's per-row state in our layout: [exp_avg, exp_avg_sq] (Adam kinds) or [sum] (Adagrad)."""
    state = opt.state[weight]
    if kind == "adagrad":
        return state["sum"].numpy()
    if kind == "sgd":
        return np.zeros((weight.shape[0], 0), np.float32)
    return np.concatenate([state["exp_avg"].numpy(), state["exp_avg_sq"].numpy()], axis=1)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("kind", [*OPTIMIZERS, "adam"])
def test_lr_zero_is_a_zero_step_with_torchs_state(kind):
    """A step at lr 0 leaves every row bit for bit, while the state moves as torch's does with the
    param group's lr at 0 (moments and step; Adagrad's sums): the steps after it match torch."""
    cfg = OPTIMIZERS.get(kind) or OptimizerConfig("adam", lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6)
    optimizer = make_optimizer(cfg)
    start = init_rows(3, np.arange(NUM_ROWS), WIDTH, 0.5)  # (NUM_ROWS, WIDTH)
    rows, state = start.copy(), optimizer.initial_state(NUM_ROWS, WIDTH)
    emb = torch.nn.Embedding(NUM_ROWS, WIDTH, sparse=kind != "adam", _weight=torch.from_numpy(start.copy()))
    reference = (torch.optim.Adam(emb.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
                 if kind == "adam" else torch_optimizer(cfg, emb.parameters()))
    rng = np.random.default_rng(0)
    for step, lr in enumerate(ZERO_STEP_LRS, start=1):
        grads = rng.standard_normal((NUM_ROWS, WIDTH)).astype(np.float32)  # every row: sparse == dense
        before = rows.copy()
        optimizer.record_step(step, lr)
        optimizer.apply(rows, state, grads, step, optimizer.lr_at(step))
        reference.param_groups[0]["lr"] = lr
        reference.zero_grad()
        emb(torch.arange(NUM_ROWS)).backward(torch.from_numpy(grads))
        reference.step()
        if lr == 0:
            np.testing.assert_array_equal(rows, before)
        np.testing.assert_allclose(rows, emb.weight.detach().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state, torch_state(kind, reference, emb.weight), rtol=1e-6, atol=1e-7)
    assert optimizer.lr_at(2) == 0.0 and optimizer.step == len(ZERO_STEP_LRS)
    assert not np.allclose(rows, start, atol=1e-3)


def test_an_absent_lr_is_the_configured_one_and_a_negative_one_is_refused():
    optimizer = make_optimizer(OPTIMIZERS["sgd"])
    assert optimizer.checked_lr(1, None) == 0.1 and optimizer.checked_lr(1, 0.0) == 0.0
    optimizer.record_step(1, None)
    assert optimizer.lr_at(1) == 0.1
    with pytest.raises(ValueError, match="pushed with learning rate 0.1, not 0.0"):
        optimizer.checked_lr(1, 0.0)  # a zero step is not the configured lr
    for bad in (-1e-300, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite and >= 0"):
            optimizer.checked_lr(2, bad)
