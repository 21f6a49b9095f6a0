"""Training through the table service: the same result as in-process tables (exact mode), rows
requested ahead of the forward, and the shards doing the work (their counters prove it)."""
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from trainer.data import Corpus
from trainer.remote_rows import table_name
from trainer.train import ServiceOptions, build, train

from test_train import corpus_dir, small_train_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def remote_rows(client, prefix: str, sizes: dict[int, list[int]], step: int) -> dict[int, np.ndarray]:
    """{layer: every row of every head's table, heads end to end} as the service holds them."""
    names = {table_name(prefix, layer, h): size for layer, s in sizes.items() for h, size in enumerate(s)}
    rows = client.fetch({name: np.arange(size) for name, size in names.items()}, min_step=step)
    return {layer: np.concatenate([rows[table_name(prefix, layer, h)].numpy() for h in range(len(s))])
            for layer, s in sizes.items()}


def test_training_through_the_service_equals_local_training(make_cluster, corpus_dir, tmp_path):
    """50 steps on 2 shards, sparse Adam at 5x, prefetch and look-ahead on, exact mode: every
    loss and the final rows equal in-process training's."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=50, warmup_steps=5,
                  table_optimizer="sparse_adam", table_lr_mult=5.0, threads=1)
    corpus = Corpus.load(cfg.corpus)
    cluster = make_cluster(2)
    with cluster.client() as client:
        remote = train(cfg, corpus, client=client, service=ServiceOptions(prefix="equiv", lookahead=True))
        pushes = [c["push_requests"] for c in ray.get([a.counters.remote() for a in cluster.actors])]
        model, indexer, _ = build(cfg, corpus)
        got = remote_rows(client, "equiv", indexer.table_sizes(), step=cfg.steps)
    ckpt = tmp_path / "local.pt"
    local = train(replace(cfg, checkpoint=str(ckpt)), corpus)

    assert pushes == [cfg.steps, cfg.steps]  # each shard took each step's push: no local fallback
    np.testing.assert_allclose(remote.train_losses, local.train_losses, rtol=1e-5)
    assert remote.val_loss == pytest.approx(local.val_loss, rel=1e-5)
    assert remote.train_losses[-1] < remote.train_losses[0] - 0.5  # it trained
    state = torch.load(ckpt, weights_only=False)["model"]
    for layer, rows in got.items():
        initial = model.tables.embeddings[str(layer)].weight.detach().numpy()
        want = state[f"tables.embeddings.{layer}.weight"].numpy()
        assert rows.shape == want.shape and not np.allclose(rows, initial)
        np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-6)
