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
