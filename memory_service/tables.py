"""What callers hand a shard and get back about one table: a push's gradients (`TablePush`), the
look-ahead a push may carry (`Announcement`) and a table's description (`TableInfo`). Plain values shared by the shard, the wire codec and the servicer,
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


@dataclass(frozen=True, eq=False)  # eq on ndarray fields would be ambiguous
class Announcement:
    """Ids {table: (n,) integer} that the fetch of table step `step` will read (None: read after
    what was announced before): placement's look-ahead, riding on a push (Shard.push) or alone
    (Shard.announce)."""

    ids: dict[str, np.ndarray]
    step: int | None = None
