"""In-process tables under the table service's optimizer math equal torch's own optimizers.

(Dense-equivalent `adam` has its own file, tests/memory_service/storage/test_dense_adam.py.)"""
import pytest
import torch

from memory_service.config import OptimizerConfig
from tests.memory_service.storage.test_dense_adam import LR, local_tables, run_local, schedule
from trainer.local_table_optimizer import LocalTableOptimizer


def torch_optimizer(kind: str, params):
    if kind == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=LR, betas=(0.8, 0.99))
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=LR, eps=1e-8)
    return torch.optim.SGD(params, lr=LR)


@pytest.mark.parametrize("kind", ["sparse_adam", "adagrad", "sgd"])
def test_in_process_equals_torch(kind):
    steps = list(schedule())[:40]
    ours = local_tables()
    opt = LocalTableOptimizer(ours, OptimizerConfig(kind, lr=LR, beta1=0.8, beta2=0.99, eps=1e-8))
    run_local(ours, opt, steps)

    theirs = local_tables()  # same init rows
    reference = torch_optimizer(kind, list(theirs.parameters()))
    for step, lr, read, ids, grads in steps:
        out = theirs.lookup(0, torch.from_numpy(ids).view(1, -1, 1))[0]
        (out * torch.from_numpy(grads)).sum().backward()
        reference.param_groups[0]["lr"] = lr
        reference.step()
        reference.zero_grad(set_to_none=True)
    got, want = ours.embeddings["0"].weight.detach(), theirs.embeddings["0"].weight.detach()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got, torch.from_numpy(local_tables().initial_rows(0)))


def test_rejects_dense_gradients():
    tables = local_tables()
    tables.embeddings["0"].sparse = False
    opt = LocalTableOptimizer(tables, OptimizerConfig("adam", lr=LR))
    tables.lookup(0, torch.tensor([[[1], [2]]])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("kind", ["sparse_adam", "adam"])
def test_a_cosine_schedule_to_zero_ends_in_a_zero_step(kind):
    """torch's CosineAnnealingLR(eta_min=0) drives the tables' group lr to exactly 0 at T_max: that
    step moves no row (before issue 21 an lr of 0 meant "the configured lr", a full step), while
    torch's own optimizer takes it with its moments updated: ours matches it to the end."""
    steps = list(schedule())[:6]  # rows pushed in every step
    ours, theirs = local_tables(), local_tables()
    opt = LocalTableOptimizer(ours, OptimizerConfig(kind, lr=LR, beta1=0.8, beta2=0.99, eps=1e-8))
    reference = (torch.optim.Adam(theirs.parameters(), lr=LR, betas=(0.8, 0.99), eps=1e-8) if kind == "adam"
                 else torch_optimizer(kind, list(theirs.parameters())))
    if kind == "adam":
        theirs.embeddings["0"].sparse = False  # torch's Adam takes dense gradients
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=len(steps) - 1, eta_min=0.0)
                  for o in (opt, reference)]
    weight = ours.embeddings["0"].weight
    everything = torch.arange(weight.shape[0])
    for _, _, _, ids, grads in steps:
        opt.catch_up(weight, everything)  # dense Adam: rows as of the last step, not where they were last read
        before = weight.detach().clone()
        for tables, o in ((ours, opt), (theirs, reference)):
            out = tables.lookup(0, torch.from_numpy(ids).view(1, -1, 1))[0]  # (n, w)
            (out * torch.from_numpy(grads)).sum().backward()
            o.step()
            o.zero_grad(set_to_none=True)
        last_lr = opt.param_groups[0]["lr"]
        for s in schedulers:
            s.step()
    assert last_lr == 0.0
    torch.testing.assert_close(weight.detach(), before, rtol=0, atol=0)  # the zero step
    opt.catch_up(weight, everything)
    torch.testing.assert_close(weight.detach(), theirs.embeddings["0"].weight.detach(), rtol=1e-6, atol=1e-7)
