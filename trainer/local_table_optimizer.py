"""The table service's optimizers, applied in-process to LocalTables' embeddings.

One implementation of the math: memory_service.storage.optimizer, the code the shards run. So a model
trained with in-process tables and one trained through the service take the same updates, and
dense-equivalent Adam (`adam`) works in both: a row is caught up over the steps it skipped when
the forward reads it (LocalTables calls `catch_up` before each gather) and when its gradient
arrives. Rows never read are never touched.

Tables on a GPU keep their rows there (the forward gathers them where the model runs) while the
optimizer state stays on the host, beside the numpy math: each step copies only the rows it
updates to the host and back, so a model trains the same on either device.
"""
from __future__ import annotations

import numpy as np
import torch

from memory_service.config import OptimizerConfig
from memory_service.storage.optimizer import make_optimizer
from trainer.engram import LocalTables


def _summed(grad: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A sparse gradient's distinct row ids (m,) sorted and their summed rows (m, width) float32.
    Repeats are summed in the order they occur, as the table service's client sums them (torch's
    coalesce sums in another order), so in-process and remote training take identical updates."""
    ids, values = (grad.indices(), grad.values()) if grad.is_coalesced() else (grad._indices(), grad._values())
    ids, values = ids.cpu(), values.cpu()  # the math runs on the host whatever the rows' device
    distinct, inverse = torch.unique(ids[0], return_inverse=True)  # (m,), (n,)
    summed = torch.zeros(len(distinct), values.shape[1]).index_add_(0, inverse, values.to(torch.float32))
    return distinct.numpy(), summed.numpy()


class LocalTableOptimizer(torch.optim.Optimizer):
    """Optimizer of kind `config.kind` over every embedding of `tables` (sparse gradients): the
    torch.optim face of the shards' `memory_service.storage.optimizer.TableOptimizer` math.

    The group's "lr" is the current step's learning rate (set it per step for a schedule); each
    step's rate is logged, as the shards log the rates pushed to them.
    """

    def __init__(self, tables: LocalTables, config: OptimizerConfig) -> None:
        params = list(tables.parameters())
        super().__init__(params, {"lr": config.lr})
        self.config = config
        self.steps_taken = 0
        self.rows_processed = 0  # rows updated or caught up, since construction
        self._math = {}
        for p in params:
            self._math[p] = make_optimizer(config)
            rows, width = p.shape
            self.state[p]["moments"] = torch.from_numpy(self._math[p].initial_state(rows, width))
            self.state[p]["last"] = torch.zeros(rows, dtype=torch.int64)  # step last brought up to date
        tables.read_hooks.append(self.catch_up)

    @torch.no_grad()
    def catch_up(self, weight: torch.Tensor, ids: torch.Tensor) -> None:
        """Brings the rows `ids` (any shape) of `weight` up to the last step, before a read."""
        math = self._math.get(weight)
        if math is None or not math.catches_up:
            return
        last = self.state[weight]["last"].numpy()  # (rows,)
        flat = ids.reshape(-1).cpu().numpy()
        behind = np.unique(flat[last[flat] < math.step])  # (m,)
        if behind.size:
            self._apply_rows(weight, behind, lambda *arrays: math.catch_up(*arrays, math.step))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One table step: every table logs it with its lr, tables with a gradient update the
        rows in it (duplicates summed in the order they occur)."""
        if closure is not None:
            raise ValueError("LocalTableOptimizer.step takes no closure")
        self.steps_taken += 1
        step = self.steps_taken
        for group in self.param_groups:
            for p in group["params"]:
                math = self._math[p]
                math.record_step(step, float(group["lr"]))
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("LocalTableOptimizer needs sparse gradients (nn.Embedding(sparse=True))")
                ids, grads = _summed(p.grad)
                self._apply_rows(p, ids, lambda r, s, l: math.update(r, s, l, grads, step))

    def _apply_rows(self, weight: torch.Tensor, ids: np.ndarray, fn) -> None:
        """Gathers rows, moments and last steps of `ids` (m,), runs fn on the copies, scatters back
        (rows on another device than the host: one copy of the m rows each way)."""
        moments, last = self.state[weight]["moments"].numpy(), self.state[weight]["last"].numpy()
        if weight.device.type == "cpu":
            rows = weight.data.numpy()
            r = rows[ids]
        else:
            index = torch.from_numpy(ids).to(weight.device)  # (m,)
            r = weight.data.index_select(0, index).cpu().numpy()  # (m, width)
        s, l = moments[ids], last[ids]
        fn(r, s, l)
        moments[ids], last[ids] = s, l
        if weight.device.type == "cpu":
            rows[ids] = r
        else:
            weight.data.index_copy_(0, index, torch.from_numpy(r).to(weight.device))
        self.rows_processed += len(ids)

    def state_dict(self) -> dict:
        """torch's optimizer state plus, per table, its step log (the learning rates catch-up
        needs) and each row's last step (kept apart: torch's loader would cast it to float)."""
        out = super().state_dict()
        params = self.param_groups[0]["params"]
        out["state"] = {i: {"moments": st["moments"]} for i, st in out["state"].items()}
        out["tables"] = [{**self._math[p].log_state(), "last": self.state[p]["last"]} for p in params]
        out["steps_taken"] = self.steps_taken
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        tables, self.steps_taken = state_dict.pop("tables"), state_dict.pop("steps_taken")
        super().load_state_dict(state_dict)  # casts the moments to each table's device
        for p, table in zip(self.param_groups[0]["params"], tables):
            self.state[p]["moments"] = self.state[p]["moments"].cpu()  # the math's state lives on the host
            self._math[p].load_log_state(table)
            self.state[p]["last"] = table["last"].clone()
