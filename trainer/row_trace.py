"""The row ids an Engram layer's tables read, request by request, in the training loader's order.

What placement policies are measured on (bench/bench_tiers.py, tests/memory_service/placement/test_policies.py): a split
cut into `context`-token sequences, shuffled each epoch by a seeded generator, read `batch_size`
sequences per step (the last partial batch of an epoch dropped); each step's row ids hashed as the
trainer hashes them and deduplicated per table, as the client asks each table's shard once for
each row a step needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memory_service.ids import sorted_unique
from trainer.row_indexer import RowIndexer


@dataclass(frozen=True)
class RowTrace:
    """`tables[h][s]`: sorted distinct row ids (n,) int64 that step s reads from table h of one
    Engram layer (tables in row-id column order: the heads of n = 2, then n = 3, ...);
    `orders[h]` is table h's N-gram order; steps run epoch after epoch."""

    tables: list[list[np.ndarray]]
    orders: tuple[int, ...]
    steps_per_epoch: int

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, indexer: RowIndexer, layer: int, context: int = 256,
                    batch_size: int = 16, epochs: int = 2, seed: int = 0) -> RowTrace:
        """The trace of `epochs` passes over split `tokens` (N,) raw ids for Engram layer `layer`."""
        if layer not in indexer.cfg.layer_ids:
            raise ValueError(f"layer {layer} is not an Engram layer of {indexer.cfg.layer_ids}")
        num_sequences = len(tokens) // context
        if context < 1 or batch_size < 1 or epochs < 1 or num_sequences < batch_size:
            raise ValueError(f"{len(tokens)} tokens give {num_sequences} sequences of context {context}: need "
                             f">= batch_size {batch_size}, and context, batch_size, epochs {epochs} >= 1")
        rows = _sequence_rows(tokens, indexer, layer, context, num_sequences)  # (S, T, H)
        rng = np.random.default_rng(seed)
        steps = num_sequences // batch_size
        tables: list[list[np.ndarray]] = [[] for _ in range(rows.shape[2])]
        for _ in range(epochs):
            order = rng.permutation(num_sequences)[: steps * batch_size].reshape(steps, batch_size)
            for batch in order:
                step_rows = rows[batch]  # (B, T, H)
                for h, table in enumerate(tables):
                    table.append(sorted_unique(step_rows[:, :, h].reshape(-1).astype(np.int64)))
        K = indexer.cfg.heads_per_ngram
        orders = tuple(n for n in range(2, indexer.cfg.max_ngram + 1) for _ in range(K))
        return cls(tables, orders, steps)

    def epoch(self, table: int, epoch: int) -> list[np.ndarray]:
        """The requests of one epoch of one table."""
        return self.tables[table][epoch * self.steps_per_epoch:(epoch + 1) * self.steps_per_epoch]

    def touched(self, table: int, epoch: int) -> int:
        """Distinct rows table `table` reads during epoch `epoch`."""
        return len(np.unique(np.concatenate(self.epoch(table, epoch))))


def _sequence_rows(tokens: np.ndarray, indexer: RowIndexer, layer: int, context: int,
                   num_sequences: int) -> np.ndarray:
    """Row ids (S, T, H) int32 of the split's consecutive `context`-token sequences (ids < 2^31:
    tables are int32-indexable), hashed in chunks to bound the int64 intermediate."""
    if max(indexer.table_sizes()[layer]) > 2**31:
        raise ValueError(f"tables of layer {layer} exceed 2^31 rows: row ids need int64 here")
    sequences = np.asarray(tokens[: num_sequences * context], dtype=np.int64).reshape(num_sequences, context)
    chunks = [indexer(torch.from_numpy(sequences[i:i + 512]))[layer].numpy().astype(np.int32)
              for i in range(0, num_sequences, 512)]
    return np.concatenate(chunks)
