"""Two training runs in two namespaces (two --prefixes) share one tables cluster whose shards
take tokens scoped to namespaces and a quota per namespace: each run, with its own namespace's
token, trains concurrently with the other (Ray tasks: processes of their own) and ends exactly
as the same run alone: the same losses and the same rows bit for bit as in-process training,
which test_remote_tables shows equal to a run on a cluster of its own. Neither token can read
or write the other run's tables."""
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import PermissionDenied, QuotaExceeded
from memory_service.shard.quotas import NamespaceQuota
from memory_service.wire.security import ClientSecurity, SecurityConfig
from tests.trainer.test_remote_tables import remote_rows
from tests.trainer.test_train import small_train_config
from trainer.data import Corpus
from trainer.remote_tables import table_name
from trainer.train import ServiceOptions, build, train

pytestmark = pytest.mark.slow
ADMIN, TOKENS = "admin-token-0", {"runa": "runa-token-1", "runb": "runb-token-2"}


@ray.remote(num_cpus=0)
def _train_remote(cfg, targets, prefix: str, token: str):
    """One run through the service in a Ray worker process, with its namespace's token."""
    from memory_service.client import MemoryClient

    with MemoryClient(targets, security=ClientSecurity(token=token)) as client:
        result = train(cfg, Corpus.load(cfg.corpus), client=client, service=ServiceOptions(prefix=prefix))
    return result.train_losses, result.val_loss


def test_two_runs_in_two_namespaces_share_a_cluster_and_each_equals_its_run_alone(make_cluster, corpus_dir,
                                                                                   tmp_path):
    base = replace(small_train_config(corpus_dir, tmp_path), steps=12, warmup_steps=2, threads=1,
                   table_optimizer="sparse_adam")  # rows as a checkpoint stores them (dense adam: caught up on read)
    cfgs = {"runa": base, "runb": replace(base, seed=1, table_lr_mult=3.0)}  # two different runs
    Corpus.load(base.corpus)  # the tokenized cache written once, before the runs read it
    security = SecurityConfig.from_tokens(write_tokens=[ADMIN], namespace_tokens={
        ns: {"write": [token]} for ns, token in TOKENS.items()})
    cluster = make_cluster(2, security=security, quotas=(NamespaceQuota("runa", max_rows=100_000),
                                                         NamespaceQuota("runb", max_rows=100_000),
                                                         NamespaceQuota("tiny", max_rows=2)))
    runs = {ns: _train_remote.remote(cfg, cluster.targets, ns, TOKENS[ns]) for ns, cfg in cfgs.items()}
    _tiny_quota_holds_across_shards(cluster)  # while the runs train
    remote = {ns: ray.get(ref, timeout=900) for ns, ref in runs.items()}

    for ns, cfg in cfgs.items():
        ckpt = tmp_path / f"{ns}.pt"
        local = train(replace(cfg, checkpoint=str(ckpt)), Corpus.load(cfg.corpus))
        assert remote[ns] == (local.train_losses, local.val_loss), ns
        _, indexer, _ = build(cfg, Corpus.load(cfg.corpus))
        with cluster.client(security=ClientSecurity(token=TOKENS[ns])) as client:
            got = remote_rows(client, ns, indexer.table_sizes(), step=cfg.steps)
            other = "runb" if ns == "runa" else "runa"
            with pytest.raises(PermissionDenied):
                client.fetch({table_name(other, 0, 0): np.arange(4)})
        state = torch.load(ckpt, weights_only=False)["model"]
        for layer, rows in got.items():
            np.testing.assert_array_equal(rows, state[f"tables.embeddings.{layer}.weight"].numpy())
    assert remote["runa"][0] != remote["runb"][0]  # two different runs, each its own


def _tiny_quota_holds_across_shards(cluster) -> None:
    """Namespace "tiny" may store 2 rows: one per shard of the 2 (rows spread by id)."""
    with cluster.client(security=ClientSecurity(token=ADMIN)) as client:
        client.create_table(TableConfig(name="tiny/t", num_rows=64, width=4, seed=1,
                                        optimizer=OptimizerConfig(kind="sgd", lr=0.1)))
        with pytest.raises(QuotaExceeded, match="namespace 'tiny'"):
            client.push({"tiny/t": (np.array([0, 2]), torch.ones(2, 4))}, step=1)  # both on shard 0
        assert client.push({"tiny/t": (np.array([0, 1]), torch.ones(2, 4))}, step=1) == 2
