"""Prefetch: a step's rows are requested before the forward needs them.

Row ids depend only on tokens, so as soon as a batch is drawn it is hashed (on the tokens' device)
and its rows of every Engram layer are requested in one fetch; with look-ahead the next step's
batch is drawn and requested too, during this step. Consistency is a number, `staleness`: the
fetch for step s names table step s - staleness as the one it must see. 0 (the default) is exact,
the result of local training, because shards hold a fetch until the pushes it must see arrived;
k > 0 lets the look-ahead fetch be answered before this step's push, at the cost of rows up to k
steps old.

Further ahead, `announce` batches are drawn and hashed early and their ids only announced (a hint,
nothing read): the hot shard's placement policy keeps rows that are about to be read, which is worth
most of what separates frequency from the optimum (bench/results/tiers_policy.md: 6 announced
steps take the hot shard's hit rate from 0.77 to 0.885 of Belady's hit rate). Batches are used in the order
drawn, so announcing changes nothing else.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.engram import EngramTables
from trainer.row_indexer import RowIndexer


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
                 staleness: int = 0, announce: int = 0):
        if staleness < 0 or announce < 0:
            raise ValueError(f"staleness {staleness} and announce {announce} must be >= 0")
        self.next_batch, self.steps = next_batch, steps
        self.indexer, self.tables = indexer, tables
        self.lookahead, self.staleness, self.announce = lookahead, staleness, announce
        self._ahead: Prepared | None = None
        self._drawn: deque[tuple[torch.Tensor, torch.Tensor, dict | None]] = deque()  # (x, y, row ids) ahead

    def next(self, step: int) -> Prepared:
        """Step `step`'s batch (steps must come in order), after sending the next step's fetch."""
        if self._ahead is not None and self._ahead.step != step:
            raise ValueError(f"steps must come in order: asked for {step}, prepared {self._ahead.step}")
        current = self._ahead or self._prepare(step)
        self._ahead = self._prepare(step + 1) if self.lookahead and step + 1 < self.steps else None
        return current

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        x, y = self.next_batch()
        return x, y, None if self.indexer is None else self.indexer(x)  # row ids on x's device

    def _prepare(self, step: int) -> Prepared:
        x, y, row_ids = self._drawn.popleft() if self._drawn else self._draw()
        if row_ids is None:
            return Prepared(step, x, y, None)
        if self.tables is not None and self.announce:  # batches step+1 .. step+announce, never past the end
            while len(self._drawn) < min(self.announce, self.steps - 1 - step):
                self._drawn.append(ahead := self._draw())  # the batch of step + len(self._drawn)
                self.tables.announce(ahead[2], min_step=self._min_step(step + len(self._drawn)))
        if self.tables is not None:  # None: rows are fetched when the forward asks
            ngrams = self.indexer.fingerprints(x) if self.tables.wants_ngrams else None
            self.tables.prefetch(row_ids, min_step=self._min_step(step), ngrams=ngrams)
        return Prepared(step, x, y, row_ids)

    def _min_step(self, step: int) -> int:
        """The table step that step `step`'s fetch waits for (its announcement names it too, so
        placement pairs the two)."""
        return max(0, step - self.staleness)
