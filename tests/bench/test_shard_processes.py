"""bench/shard_processes.py, the benches' shards as plain local processes (no Ray): they serve, a hot shard takes rows, training through
them equals in-process training, and shutdown ends every process."""
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, TableConfig
from trainer.data import Corpus
from trainer.train import ServiceOptions, train

from tests.trainer.test_train import small_train_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from shard_processes import start_processes  # noqa: E402

pytestmark = pytest.mark.slow  # three shard processes, then a short training run


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_shards_serve_migrate_and_stop():
    shards = start_processes(num_shards=2, num_hot=1, hot_rows=64, niceness=0, migrate_interval_s=0.01,
                             migrate_max_duty=1.0)
    try:
        assert len(shards.targets) == 2 and len(shards.hot_targets) == 1 and all(map(alive, shards.pids))
        with shards.client() as client:
            client.create_table(TableConfig("t", num_rows=1000, width=8, optimizer=OptimizerConfig("sgd", lr=1.0)))
            ids = np.arange(0, 1000, 7)
            before = client.fetch({"t": ids})["t"].numpy()
            for step in range(1, 21):  # reads the migrator sees, with time for its rounds: rows go hot
                client.fetch({"t": ids[:32]}, min_step=step - 1)
                client.push({"t": (ids, np.ones((len(ids), 8), np.float32))}, step=step)
                time.sleep(0.05)
            after = client.fetch({"t": ids}, min_step=20)["t"].numpy()
            np.testing.assert_allclose(after, before - 20, rtol=1e-5, atol=1e-5)
            served = {(s.role or "cold", s.shard_id): s.counters.fetch_rows for s in client.stats()}
            assert served[("hot", 0)] > 0, served  # rows moved to the hot shard and were read there
    finally:
        shards.shutdown()
    assert not any(map(alive, shards.pids))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_through_local_shards_equals_in_process_training(device, corpus_dir, tmp_path):
    """12 steps, exact mode: the same losses as in-process tables on the same device. On a GPU the
    rows arrive there through pinned buffers, gradients leave through them, and the hot shard
    keeps its rows in GPU memory; the tolerance is wider there for the GPU's non-deterministic
    kernels (atomics in some backward passes), not for the tables."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=12, warmup_steps=2,
                  table_optimizer="sparse_adam", threads=1, device=device)
    corpus = Corpus.load(cfg.corpus)
    hot_device = "cuda" if device == "cuda" else None
    with start_processes(num_shards=2, num_hot=1, hot_rows=128, niceness=0, hot_device=hot_device) as shards, \
            shards.client() as client:
        remote = train(cfg, corpus, client=client, service=ServiceOptions(prefix="local-shards"))
    local = train(cfg, corpus)
    rtol = 1e-5 if device == "cpu" else 1e-4
    np.testing.assert_allclose(remote.train_losses, local.train_losses, rtol=rtol)
    assert remote.val_loss == pytest.approx(local.val_loss, rel=rtol)
