"""What callers hand a shard and get back about one table: a push's gradients (`TablePush`) and a
table's description (`TableInfo`). Plain values shared by the shard, the wire codec and the servicer,
so none of them imports another for its types.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memory_service.config import TableConfig


@dataclass(frozen=True)
class TableInfo:
    config: TableConfig
    step: int
    rows_materialized: int
    nbytes: int
    optimizer_rows: int = 0  # rows the optimizer processed (updated or caught up)


@dataclass(frozen=True, eq=False)  # eq on ndarray fields would be ambiguous
class TablePush:
    """Gradients of one table: ids (n,) integer, grads (n, width) float, at table `step` >= 1 with
    learning rate `lr` (None: the table's configured lr)."""

    step: int
    ids: np.ndarray
    grads: np.ndarray
    lr: float | None = None
