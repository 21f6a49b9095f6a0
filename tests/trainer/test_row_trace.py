"""RowTrace: the rows a layer's tables read per step, in the training loader's order."""
import numpy as np
import pytest
import torch

from trainer.data import Corpus, CorpusConfig
from trainer.row_trace import RowTrace
from trainer.train import TrainConfig, build_indexer

CONTEXT, BATCH, STEPS = 256, 16, 10


@pytest.fixture(scope="module")
def setup():
    corpus = Corpus.load(CorpusConfig())
    cfg = TrainConfig()
    tokens = np.asarray(corpus.train[: CONTEXT * BATCH * STEPS])  # exactly STEPS steps: nothing dropped
    return tokens, build_indexer(cfg, corpus), cfg.model.engram.layer_ids[0]


def test_steps_hold_each_tables_distinct_rows_in_loader_order(setup):
    tokens, indexer, layer = setup
    trace = RowTrace.from_tokens(tokens, indexer, layer, CONTEXT, BATCH, epochs=2, seed=3)
    K = indexer.cfg.heads_per_ngram
    assert trace.orders == (2,) * K + (3,) * K and trace.steps_per_epoch == STEPS
    sequences = torch.from_numpy(tokens.astype(np.int64).reshape(-1, CONTEXT))
    rng = np.random.default_rng(3)
    for epoch in range(2):
        order = rng.permutation(len(sequences))
        for step in (0, STEPS - 1):
            rows = indexer(sequences[order[step * BATCH:(step + 1) * BATCH]])[layer].numpy()  # (B, T, H)
            for h, table in enumerate(trace.tables):
                np.testing.assert_array_equal(table[epoch * STEPS + step], np.unique(rows[:, :, h]))
    for h in range(len(trace.tables)):  # each epoch reads every sequence once
        assert trace.touched(h, 0) == trace.touched(h, 1)
        sizes = np.array([indexer.table_sizes()[layer][h]])
        assert all(b.dtype == np.int64 and (b < sizes).all() for b in trace.tables[h])


def test_epochs_are_reshuffled_by_seed(setup):
    tokens, indexer, layer = setup
    a = RowTrace.from_tokens(tokens, indexer, layer, CONTEXT, BATCH, epochs=2, seed=0)
    b = RowTrace.from_tokens(tokens, indexer, layer, CONTEXT, BATCH, epochs=2, seed=0)
    c = RowTrace.from_tokens(tokens, indexer, layer, CONTEXT, BATCH, epochs=2, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.tables[0], b.tables[0]))
    assert not all(np.array_equal(x, y) for x, y in zip(a.epoch(0, 0), a.epoch(0, 1)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.tables[0], c.tables[0]))


def test_bad_arguments(setup):
    tokens, indexer, layer = setup
    with pytest.raises(ValueError, match="layer 7 is not an Engram layer"):
        RowTrace.from_tokens(tokens, indexer, 7)
    with pytest.raises(ValueError, match="need >= batch_size 16"):
        RowTrace.from_tokens(tokens[: CONTEXT * 15], indexer, layer)
