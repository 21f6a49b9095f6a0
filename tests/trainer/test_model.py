"""The hyper-connection decoder: M branches start as one, then diverge; the iso-FLOPs baseline."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from trainer.engram import EngramConfig, LocalTables
from trainer.model import EngramLM, ModelConfig
from trainer.row_indexer import RowIndexer, identity_compression

VOCAB = 97


def small_model(num_branches: int, engram: bool = True, seed: int = 0, iso_flops: bool = True):
    e = EngramConfig(hidden_size=32, num_branches=num_branches, max_ngram=3, heads_per_ngram=2, d_mem=16,
                     table_sizes=(101, 103), layer_ids=(1,), init_scale=0.1)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, mlp_hidden=64, context=24,
                      num_branches=num_branches, engram=e)
    indexer = RowIndexer(e, identity_compression(VOCAB), raw_pad_id=0)
    if not engram:
        return EngramLM(cfg.iso_flops_baseline() if iso_flops else replace(cfg, engram=None), seed=seed), None
    return EngramLM(cfg, LocalTables(e, indexer.table_sizes()), seed=seed), indexer


def logits(model, indexer, x):
    return model(x, indexer(x) if indexer else None)


def tokens(seed=0, B=3, T=24):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("engram", [True, False])
def test_four_branches_equal_one_branch_at_init(engram):
    x = tokens()
    m1, i1 = small_model(1, engram, iso_flops=False)
    m4, i4 = small_model(4, engram, iso_flops=False)
    a, b = logits(m1, i1, x), logits(m4, i4, x)
    assert a.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def train_steps(model, indexer, steps=4):
    dense = torch.optim.AdamW(model.dense_parameters(), lr=1e-2)
    tables = torch.optim.SparseAdam(list(model.tables.parameters()), lr=5e-2) if model.tables else None
    for step in range(steps):
        x = tokens(seed=10 + step)
        loss = F.cross_entropy(logits(model, indexer, x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        dense.zero_grad()
        if tables:
            tables.zero_grad()
        loss.backward()
        dense.step()
        if tables:
            tables.step()


def test_branches_diverge_after_training():
    m1, i1 = small_model(1)
    m4, i4 = small_model(4)
    train_steps(m1, i1)
    train_steps(m4, i4)
    x = tokens(seed=99)
    assert (logits(m4, i4, x) - logits(m1, i1, x)).abs().max() > 1e-3
    block = m4.blocks[0]
    assert not torch.equal(block.attn_hc.mix.detach(), torch.eye(4))
    w = m4.blocks[1].engram.proj.weight.view(5, 32, -1)
    assert not torch.allclose(w[1], w[2])  # each branch's W_K learns its own key


def test_iso_flops_baseline_spends_engram_projection_flops_on_mlp():
    m, _ = small_model(4)
    base = m.cfg.iso_flops_baseline()
    assert base.engram is None and base.mlp_extra_layers == (1,)
    engram_flops = m.blocks[1].engram.flops_per_token()
    mlp_flops = 2 * 3 * base.hidden_size * base.mlp_extra
    assert abs(mlp_flops - engram_flops) / engram_flops < 0.01


def test_tables_only_rows_in_batch_move():
    model, indexer = small_model(2)
    before = model.tables.embeddings["1"].weight.detach().clone()
    train_steps(model, indexer, steps=1)
    ids = indexer(tokens(seed=10))[1] + model.tables.offsets_1  # the rows of step 0's batch
    touched = set(ids.flatten().tolist())
    after = model.tables.embeddings["1"].weight.detach()
    moved = set(torch.nonzero((after != before).any(-1)).flatten().tolist())
    assert moved and moved <= touched


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="exceeds the context 24"):
        m, i = small_model(1, engram=False)
        m(torch.zeros(1, 25, dtype=torch.long))
    m, i = small_model(1)
    with pytest.raises(ValueError, match="Engram layer 1 needs row ids"):
        m(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="engram hidden/branches"):
        replace(m.cfg, num_branches=2)
    with pytest.raises(ValueError, match="unknown model preset 'big'"):
        ModelConfig.from_name("big")
