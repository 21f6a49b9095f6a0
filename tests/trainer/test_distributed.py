"""Ray Train: 2 data-parallel workers with half the batch each take the steps 1 worker with the
whole batch takes (dense gradients all-reduced, table gradients summed once per step on the shards)."""
from dataclasses import replace

import numpy as np
import pytest

from trainer.data import Corpus
from trainer.distributed import train_workers
from trainer.train import ServiceOptions, train

from tests.trainer.test_train import small_train_config

pytestmark = pytest.mark.slow


def test_two_workers_match_one_worker_with_the_whole_batch(make_cluster, corpus_dir, tmp_path):
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=20, warmup_steps=2, threads=1,
                  batch_size=8, progress=False)
    corpus = Corpus.load(cfg.corpus)  # builds the cached tokenizer and tokens the workers read
    cluster = make_cluster(2)
    name = cluster.config.name
    two = train_workers(cfg, workers=2, cluster_name=name, service=ServiceOptions(prefix="dp2"),
                        cpus_per_worker=0.5, storage_path=str(tmp_path / "ray_train"))
    with cluster.client() as client:
        one = train(cfg, corpus, client=client, service=ServiceOptions(prefix="dp1"))
        stats = client.stats()
    assert len(two.train_losses) == 20
    np.testing.assert_allclose(two.train_losses, one.train_losses, rtol=1e-5)
    assert two.val_loss == pytest.approx(one.val_loss, rel=1e-5)
    # the 2-worker tables took 20 steps, each applied once (not 40)
    steps = {t.name: t.step for shard in stats for t in shard.tables if t.name.startswith("dp2/")}
    assert steps and set(steps.values()) == {20}


def test_two_workers_resume_from_a_checkpoint_of_two_workers(make_cluster, corpus_dir, tmp_path):
    """2 workers save at step 4 of 8 (rank 0 saves while rank 1 waits on the step); 2 workers
    resumed from it on 3 fresh shards take the steps the uninterrupted run took."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=8, warmup_steps=2, threads=1,
                  batch_size=8, progress=False)
    Corpus.load(cfg.corpus)
    service = ServiceOptions(prefix="dpr")
    first = train_workers(replace(cfg, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=4), workers=2,
                          cluster_name=make_cluster(2).config.name, service=service, cpus_per_worker=0.5,
                          storage_path=str(tmp_path / "ray_train"))
    (tmp_path / "ck" / "step-00000008").rename(tmp_path / "later")  # resume from step 4, the latest left
    resumed = train_workers(replace(cfg, resume_from=str(tmp_path / "ck")), workers=2,
                            cluster_name=make_cluster(3).config.name, service=service, cpus_per_worker=0.5,
                            storage_path=str(tmp_path / "ray_train"))
    assert resumed.train_losses[:4] == first.train_losses[:4]
    np.testing.assert_allclose(resumed.train_losses[4:], first.train_losses[4:], rtol=0, atol=1e-6)
    assert resumed.val_loss == pytest.approx(first.val_loss, abs=1e-6)
