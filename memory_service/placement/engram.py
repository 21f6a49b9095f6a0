"""The default placement policy: decaying count-min frequencies, TinyLFU-style admission and the
look-ahead of announced requests (`EngramPolicy`).
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import check_ids
from memory_service.placement.lookahead import Lookahead
from memory_service.placement.policy import Policy, Reads, plan_by_keys
from memory_service.placement.sketch import CountMinSketch


class EngramPolicy(Policy):
    """Frequency from a decaying count-min sketch, TinyLFU-style admission, and the look-ahead.

    Rank of a row: first whether a look-ahead request reads it, nearest request first (requests
    in step order, see `Policy.expect`), then its estimated read count. A plan keeps the
    `capacity` best-ranked rows among the resident ones and those just read, so
    - a row of an announced request stays in, or comes in if it was just read, even when rare: it
      is a hit that many requests from now. Belady's MIN keeps the rows read again soonest; the
      look-ahead gives that time exactly for the announced requests and the frequency estimates it
      for the rest. Under shuffled batches there is no other signal to beat plain LFU with
      (reads are exchangeable: recency says nothing), so how far past LFU this policy goes is set
      by how many requests are announced (bench/results/tiers_policy.md);
    - otherwise a just-read row displaces a resident one only if its estimate is strictly higher
      (TinyLFU's admission): one-off rows, a large share of those a table touches, never churn the
      tier.
    Counters are halved after every `decay_period` x `capacity` recorded reads, so popularity fades
    over ~that many reads (TinyLFU's reset): long periods suit the stationary training stream,
    short ones follow drift faster. No LRU admission window (W-TinyLFU's): shuffled training
    batches carry no recency for it to catch; the announced requests are this policy's window.

    Memory: the sketch, 2 * depth * width bytes with width the power of two >= `width_per_row` x
    capacity (256 KiB for 8k rows at the defaults), plus the ids recorded since the last plan and
    those of at most `max_lookahead` announced requests; independent of the table's size and of
    how many distinct rows were read.
    """

    def __init__(self, capacity: int, width_per_row: int = 4, depth: int = 4, decay_period: int = 256,
                 max_lookahead: int = 16, seed: int = 0) -> None:
        super().__init__(capacity)
        if width_per_row < 1 or decay_period < 1:
            raise ValueError(f"width_per_row {width_per_row} and decay_period {decay_period} must be >= 1")
        width = 1 << max(8, int(np.ceil(np.log2(max(1, width_per_row * capacity)))))
        self.sketch = CountMinSketch(width, depth, seed)
        self.decay_every = decay_period * max(1, capacity)
        self.lookahead = Lookahead(max_lookahead)
        self._since_decay = 0
        self._reads = Reads()

    def record(self, ids: np.ndarray) -> None:
        ids = check_ids("ids", ids)
        self.sketch.add(ids)
        self._since_decay += len(ids)
        if self._since_decay >= self.decay_every:
            self.sketch.halve()
            self._since_decay = 0
        self._reads.add(ids)
        self.lookahead.consume(ids)

    def expect(self, ids: np.ndarray, step: int | None = None) -> None:
        """Ids (n,) of a coming request (see Policy.expect)."""
        self.lookahead.announce(check_ids("ids", ids), step)

    def plan(self, resident, max_moves=None):
        return plan_by_keys(self._reads, resident, max_moves, self.capacity, self._rank)

    def _rank(self, resident: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys float64 of both: the estimated count (< 2^16), plus 2^40 x (max_lookahead -
        distance) for a row of an announced request, so the nearest announced rows rank first."""
        ids = np.concatenate([resident, candidates])  # one sketch lookup and one search for both
        distance = self.lookahead.distance(ids)
        boost = np.where(distance >= 0, (self.lookahead.max_requests - distance) * 2.0**40, 0.0)
        keys = self.sketch.estimate(ids).astype(np.float64) + boost
        return keys[:len(resident)], keys[len(resident):]
