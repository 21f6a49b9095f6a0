"""QuantizedInitialRows: the never-written rows of a quantized (frozen) table, packed as its stored
rows are, so that a read returns the same layout whether a row was written or not."""
from __future__ import annotations

import numpy as np

from memory_service import quantization
from memory_service.config import TableConfig
from memory_service.rows import InitialRows


class QuantizedInitialRows(InitialRows):
    """`InitialRows` of table `cfg` whose calls return packed rows (n, cfg.stored_width) float32
    words (memory_service/quantization.py): the computed rows quantized. What it remembers are
    the computed float rows, so `initial_rows_many` can share its computation with other tables;
    `pack` turns what that returns into stored rows."""

    def __init__(self, cfg: TableConfig) -> None:
        super().__init__(cfg.seed, cfg.width, cfg.init_scale)
        self.kind = cfg.quantization

    def __call__(self, ids: np.ndarray, remember: bool = False) -> np.ndarray:
        return self.pack(super().__call__(ids, remember))

    def pack(self, rows: np.ndarray) -> np.ndarray:
        """Computed rows (n, width) float32 -> packed rows (n, stored_width)."""
        return quantization.quantize(rows, self.kind)
