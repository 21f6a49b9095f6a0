"""Training resumed from a checkpoint continues as the uninterrupted run: through the table service
onto a cluster of another shape, and with in-process tables; `engram generate` reads a checkpoint
directory; a checkpoint that does not fit the run is refused before anything changes."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from memory_service.config import TableConfig
from memory_service.durability.checkpoint import checkpoint_path, latest_checkpoint
from trainer.data import Corpus
from trainer.train import ServiceOptions, build, train

from tests.trainer.test_remote_tables import remote_rows
from tests.trainer.test_train import small_train_config

pytestmark = pytest.mark.slow

N = 6  # steps before the checkpoint, and after it


def test_resumed_service_training_matches_the_uninterrupted_run(make_cluster, corpus_dir, tmp_path, capsys):
    """2N steps with dense-equivalent Adam tables on 2 shards, uninterrupted; the same run on 2
    cold + 1 hot shards saving a checkpoint every N steps (the save must not change the run, nor
    take in the table of another run on that cluster, at another step), then resumed there from
    step N (a job rerun: its tables are on the cluster, at step 2N, and are replaced); and
    a run resumed from the step-N checkpoint on 3 fresh shards. The resumed steps' losses, the
    held-out loss and every final row match the uninterrupted run within 1e-6."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=2 * N, warmup_steps=2, threads=1,
                  table_optimizer="adam")
    corpus = Corpus.load(cfg.corpus)
    sizes = build(cfg, corpus)[1].table_sizes()
    service = ServiceOptions(prefix="resume")
    runs = tmp_path / "runs"

    with make_cluster(2).client() as client:
        plain = train(cfg, corpus, client=client, service=service)
        plain_rows = remote_rows(client, "resume", sizes, step=2 * N)
    with make_cluster(2, num_hot=1, hot_rows=128, migrate_interval_s=0.01, migrate_max_duty=1.0).client() as client:
        client.create_table(TableConfig("another-run/t", num_rows=64, width=4))  # a run sharing the cluster,
        for step in range(1, 2 * N + 3):  # ahead of this one: its checkpoints must leave that table out
            client.push({"another-run/t": (np.arange(2), np.ones((2, 4), np.float32))}, step)
        saving = train(replace(cfg, checkpoint_dir=str(runs), checkpoint_every=N), corpus, client=client,
                       service=service)
        # a job rerun on the same tables cluster: its tables are there, at step 2N; the resume replaces them
        rerun = train(replace(cfg, resume_from=str(checkpoint_path(runs, N))), corpus, client=client, service=service)
        rerun_rows = remote_rows(client, "resume", sizes, step=2 * N)
    assert latest_checkpoint(runs) == checkpoint_path(runs, 2 * N)
    with make_cluster(3).client() as client:
        resumed = train(replace(cfg, resume_from=str(checkpoint_path(runs, N))), corpus, client=client,
                        service=service)
        resumed_rows = remote_rows(client, "resume", sizes, step=2 * N)

    np.testing.assert_allclose(saving.train_losses, plain.train_losses, rtol=0, atol=1e-6)
    assert resumed.train_losses[:N] == saving.train_losses[:N]  # the history came with the checkpoint
    np.testing.assert_allclose(resumed.train_losses[N:], plain.train_losses[N:], rtol=0, atol=1e-6)
    assert resumed.val_loss == pytest.approx(plain.val_loss, abs=1e-6)
    np.testing.assert_allclose(rerun.train_losses[N:], plain.train_losses[N:], rtol=0, atol=1e-6)
    for layer, rows in plain_rows.items():
        np.testing.assert_allclose(resumed_rows[layer], rows, rtol=0, atol=1e-6)
        np.testing.assert_allclose(rerun_rows[layer], rows, rtol=0, atol=1e-6)
    assert plain.train_losses[-1] < plain.train_losses[0]  # it trained
    print(f"max |loss diff| {np.abs(np.subtract(resumed.train_losses[N:], plain.train_losses[N:])).max():.2e}, "
          f"max |row diff| {max(np.abs(resumed_rows[k] - plain_rows[k]).max() for k in plain_rows):.2e}")


def test_resumed_local_training_is_bit_identical(corpus_dir, tmp_path):
    """In-process tables (their optimizer's step logs and moments travel in the dense part):
    resumed from step N, every loss and weight equals the uninterrupted run's; the resumed run
    saves step 2N again, replacing the first run's checkpoint of it whole."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=2 * N, warmup_steps=2, threads=1,
                  checkpoint=str(tmp_path / "plain.pt"))
    ck = tmp_path / "ck"
    plain = train(cfg)
    first = train(replace(cfg, checkpoint_dir=str(ck), checkpoint_every=N, checkpoint=None))
    resumed = train(replace(cfg, resume_from=str(checkpoint_path(ck, N)), checkpoint_dir=str(ck),
                            checkpoint_every=N, checkpoint=str(tmp_path / "resumed.pt")))
    assert first.train_losses == plain.train_losses
    assert resumed.train_losses == plain.train_losses and resumed.val_loss == plain.val_loss
    want, got = (torch.load(tmp_path / f, weights_only=False)["model"] for f in ("plain.pt", "resumed.pt"))
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert sorted(p.name for p in ck.iterdir()) == [f"step-{N:08d}", f"step-{2 * N:08d}"]
    assert latest_checkpoint(ck) == checkpoint_path(ck, 2 * N)


def test_generate_reads_a_checkpoint_directory(corpus_dir, tmp_path, capsys):
    from trainer.cli import main

    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=4, warmup_steps=1, threads=1,
                  checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=4, checkpoint=str(tmp_path / "model.pt"))
    train(cfg)
    capsys.readouterr()
    for path in (tmp_path / "model.pt", checkpoint_path(tmp_path / "ck", 4)):
        assert main(["generate", "--checkpoint", str(path), "--prompt", "def main(", "--max-new-tokens", "5"]) == 0
    from_file, from_dir = capsys.readouterr().out.splitlines()[-2:]
    assert from_file == from_dir and from_file.startswith("def main(")


def test_a_checkpoint_that_does_not_fit_the_run_is_refused(make_cluster, corpus_dir, tmp_path):
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=4, warmup_steps=1, threads=1,
                  checkpoint_dir=str(tmp_path / "local"), checkpoint_every=2)
    train(cfg)
    cluster = make_cluster(1)
    with cluster.client() as client:
        with pytest.raises(ValueError, match="no service tables"):
            train(replace(cfg, resume_from=str(tmp_path / "local")), client=client)
        with pytest.raises(ValueError, match="nothing left to train"):
            train(replace(cfg, resume_from=str(tmp_path / "local")))
        service_cfg = replace(cfg, checkpoint_dir=str(tmp_path / "remote"))
        train(service_cfg, client=client, service=ServiceOptions(prefix="fits"))
    with pytest.raises(ValueError, match="holds tables of the table service"):
        train(replace(cfg, steps=8, resume_from=str(tmp_path / "remote")))
    with make_cluster(1).client() as client:
        with pytest.raises(ValueError, match="resume with --prefix fits"):
            train(replace(cfg, steps=8, resume_from=str(tmp_path / "remote")), client=client,
                  service=ServiceOptions(prefix="other"))
        assert not client.stats()[0].tables  # refused before any table was restored
    with pytest.raises(ValueError, match="checkpoint_every 2 must be >= 0, and > 0 needs a checkpoint_dir"):
        replace(cfg, checkpoint_dir=None)
