"""Prefetch: a step's rows are requested before the forward needs them.

Row ids depend only on tokens, so as soon as a batch is drawn it is hashed (on the tokens' device)
and its rows of every Engram layer are requested in one fetch; with look-ahead the next step's
batch is drawn and requested too, during this step. Consistency is a number, `staleness`: the
fetch for step s names table step s - staleness as the one it must see. 0 (the default) is exact,
the result of local training, because shards hold a fetch until the pushes it must see arrived;
k > 0 lets the look-ahead fetch be answered before this step's push, at the cost of rows up to k
steps old.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.engram import EngramTables
from trainer.row_index import RowIndexer


@dataclass
class Prepared:
    """Step `step`'s batch: tokens x, targets y (B, T) and row ids {layer: (B, T, H)} (None for a
    model without Engram), its rows already on the way."""

    step: int
    x: torch.Tensor
    y: torch.Tensor
    row_ids: dict[int, torch.Tensor] | None


class Prefetcher:
    """Draws batches from `next_batch` for steps 0 .. steps-1 in order and requests their rows.

    `next_batch()` -> (x, y) on the training device. The look-ahead never reaches past the last
    step: a fetch for a step that never comes would be held at the shards."""

    def __init__(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int,
                 indexer: RowIndexer | None, tables: EngramTables | None, lookahead: bool = True,
                 staleness: int = 0):
        if staleness < 0:
            raise ValueError(f"staleness {staleness} must be >= 0")
        self.next_batch, self.steps = next_batch, steps
        self.indexer, self.tables = indexer, tables
        self.lookahead, self.staleness = lookahead, staleness
        self._ahead: Prepared | None = None

    def next(self, step: int) -> Prepared:
        """Step `step`'s batch (steps must come in order), after sending the next step's fetch."""
        if self._ahead is not None and self._ahead.step != step:
            raise ValueError(f"steps must come in order: asked for {step}, prepared {self._ahead.step}")
        current = self._ahead or self._prepare(step)
        self._ahead = self._prepare(step + 1) if self.lookahead and step + 1 < self.steps else None
        return current

    def _prepare(self, step: int) -> Prepared:
        x, y = self.next_batch()
        if self.indexer is None:
            return Prepared(step, x, y, None)
        row_ids = self.indexer(x)  # on x's device
        if self.tables is not None:  # None: rows are fetched when the forward asks
            ngrams = self.indexer.fingerprints(x) if self.tables.wants_ngrams else None
            self.tables.prefetch(row_ids, min_step=max(0, step - self.staleness), ngrams=ngrams)
        return Prepared(step, x, y, row_ids)
