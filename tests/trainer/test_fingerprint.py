"""N-gram fingerprints: equal iff the suffix N-gram tuples are equal (checked against Python tuples),
pads before the sequence start, and RowIndexer's columns line up with its row ids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.engram import EngramConfig
from trainer.fingerprint import ngram_fingerprints
from trainer.row_indexer import RowIndexer, identity_compression

PAD = 0


def tuples(ids: np.ndarray, n: int) -> list[list[tuple]]:
    padded = [[PAD] * (n - 1) + row for row in ids.tolist()]
    return [[tuple(row[t:t + n]) for t in range(ids.shape[1])] for row in padded]


@pytest.mark.parametrize("max_ngram", [2, 3, 4])
def test_equal_fingerprints_iff_equal_tuples(max_ngram):
    rng = np.random.default_rng(max_ngram)
    ids = rng.integers(0, 6, size=(4, 300))  # a small vocabulary: many repeated N-grams
    for n, fps in zip(range(2, max_ngram + 1), ngram_fingerprints(ids, max_ngram, PAD)):
        assert fps.shape == ids.shape and fps.dtype == np.uint64
        by_tuple = {}
        for tup, fp in zip(sum(tuples(ids, n), []), fps.reshape(-1).tolist()):
            by_tuple.setdefault(tup, set()).add(fp)
        assert all(len(v) == 1 for v in by_tuple.values())  # one fingerprint per tuple
        assert len({next(iter(v)) for v in by_tuple.values()}) == len(by_tuple)  # distinct tuples differ


def test_orders_differ_and_checks():
    ids = np.array([[1, 1, 1]])
    two, three = ngram_fingerprints(ids, 3, PAD)
    assert two[0, 2] != three[0, 2]  # (1, 1) and (1, 1, 1)
    with pytest.raises(ValueError, match="2-D"):
        ngram_fingerprints(np.arange(3), 3, PAD)


def test_row_indexer_columns_match_row_ids():
    cfg = EngramConfig(hidden_size=8, num_branches=1, max_ngram=3, heads_per_ngram=2, d_mem=4,
                       table_sizes=(101, 103), layer_ids=(0, 2))
    indexer = RowIndexer(cfg, identity_compression(50), raw_pad_id=PAD)
    tokens = torch.randint(0, 50, (2, 40))
    rows, fps = indexer(tokens), indexer.fingerprints(tokens)
    two, three = ngram_fingerprints(tokens.numpy(), 3, PAD)
    for layer in cfg.layer_ids:
        assert fps[layer].shape == tuple(rows[layer].shape) == (2, 40, 4)
        for k in range(2):
            np.testing.assert_array_equal(fps[layer][..., k], two)  # heads of n = 2 first
            np.testing.assert_array_equal(fps[layer][..., 2 + k], three)
