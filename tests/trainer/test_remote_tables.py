"""Training through the table service: the same result as in-process tables (exact mode), rows
requested ahead of the forward, and the shards doing the work (their counters prove it)."""
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from trainer.data import Corpus
from trainer.remote_tables import table_name
from trainer.train import ServiceOptions, build, train

from tests.trainer.test_train import small_train_config

pytestmark = pytest.mark.slow


def remote_rows(client, prefix: str, sizes: dict[int, list[int]], step: int) -> dict[int, np.ndarray]:
    """{layer: every row of every head's table, heads end to end} as the service holds them."""
    names = {table_name(prefix, layer, h): size for layer, s in sizes.items() for h, size in enumerate(s)}
    rows = client.fetch({name: np.arange(size) for name, size in names.items()}, min_step=step)
    return {layer: np.concatenate([rows[table_name(prefix, layer, h)].numpy() for h in range(len(s))])
            for layer, s in sizes.items()}


@pytest.mark.parametrize("num_hot,optimizer", [(0, "sparse_adam"), (1, "sparse_adam"), (1, "adam")],
                         ids=["cold", "hot+cold", "hot+cold-dense-adam"])
def test_training_through_the_service_equals_local_training(make_cluster, corpus_dir, tmp_path, num_hot, optimizer):
    """50 steps on 2 shards (and a hot shard whose small capacity keeps rows migrating), sparse
    Adam at 5x (and the demo's dense-equivalent Adam, whose catch-up must not depend on how the
    shards batch rows), prefetch and look-ahead on, exact mode: every loss and the final rows are
    those of in-process training, bit for bit (the issue asks 1e-5)."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=50, warmup_steps=5,
                  table_optimizer=optimizer, table_lr_mult=5.0, threads=1)
    corpus = Corpus.load(cfg.corpus)
    cluster = make_cluster(2, num_hot=num_hot, hot_rows=128, migrate_interval_s=0.01,
                           migrate_max_duty=1.0)  # rows move all along
    with cluster.client() as client:
        remote = train(cfg, corpus, client=client, service=ServiceOptions(prefix="equiv", lookahead=True))
        pushes = [c["push_requests"] for c in ray.get([a.counters.remote() for a in cluster.actors])]
        moves = [ray.get(a.migration_counters.remote()) for a in cluster.hot_actors]
        for a in cluster.hot_actors:
            ray.get(a.stop_migration.remote())  # rows hold still while we read them all
        model, indexer, _ = build(cfg, corpus)
        got = remote_rows(client, "equiv", indexer.table_sizes(), step=cfg.steps)
    ckpt = tmp_path / "local.pt"
    local = train(replace(cfg, checkpoint=str(ckpt)), corpus)

    assert min(pushes) >= cfg.steps  # each cold shard took each step's push: no local fallback
    assert all(m["promoted"] > 0 and m["demoted"] > 0 and not m["error"] for m in moves), moves
    assert remote.train_losses == local.train_losses
    assert remote.val_loss == local.val_loss
    assert remote.train_losses[-1] < remote.train_losses[0] - 0.5  # it trained
    if optimizer == "adam":  # the checkpoint stores rows as last written; a service read catches them
        return  # up first, so the rows compare only through the losses above (every step read them)
    state = torch.load(ckpt, weights_only=False)["model"]
    for layer, rows in got.items():
        initial = model.tables.embeddings[str(layer)].weight.detach().numpy()
        want = state[f"tables.embeddings.{layer}.weight"].numpy()
        assert rows.shape == want.shape and not np.allclose(rows, initial)
        np.testing.assert_array_equal(rows, want)


def test_prefetch_runs_ahead_of_the_forward_and_the_backward(make_cluster, corpus_dir, tmp_path):
    """Every shard request for step s leaves before the forward reaches the first Engram layer,
    and the look-ahead request for step s+1 before step s's backward ends (the last gradient
    backward computes is the token embedding's)."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=6, warmup_steps=1, threads=1)
    corpus = Corpus.load(cfg.corpus)
    cluster = make_cluster(2)
    events = []
    import trainer.train as train_module

    real_build = train_module.build

    def build_and_watch(*args, **kwargs):  # the real model, with hooks that log what happens
        model, indexer, summary = real_build(*args, **kwargs)
        engram = next(b.engram for b in model.blocks if b.engram is not None)
        forwards = iter(range(cfg.steps))
        engram.register_forward_pre_hook(
            lambda m, a: events.append(("engram_forward", next(forwards))) if m.training else None)
        backwards = iter(range(cfg.steps))
        model.embed.weight.register_post_accumulate_grad_hook(
            lambda p: events.append(("backward_end", next(backwards))))
        return model, indexer, summary

    with cluster.client() as client:
        client.trace = lambda kind, f: events.append((kind, f.get("step"), f.get("shard")))
        train_module.build = build_and_watch
        try:
            train(cfg, corpus, client=client, service=ServiceOptions(prefix="order"))
        finally:
            train_module.build = real_build
    position = {}
    for i, event in enumerate(events):
        position.setdefault(event, i)
    for s in range(cfg.steps):
        sent = [position[("fetch_sent", s, shard)] for shard in (0, 1)]
        assert max(sent) < position[("engram_forward", s)], s
        if s + 1 < cfg.steps:
            assert max(position[("fetch_sent", s + 1, shard)] for shard in (0, 1)) < position[("backward_end", s)], s
    # the look-ahead never reaches past the last step: fetches of step `steps` are the evaluation's
    last_backward = position[("backward_end", cfg.steps - 1)]
    assert all(i > last_backward for i, e in enumerate(events) if e[:2] == ("fetch_sent", cfg.steps))


def test_generation_reads_rows_from_the_service_ahead_of_each_forward(make_cluster, corpus_dir, tmp_path, capsys):
    """A checkpoint trained through the service generates with its rows read from the service
    (read-only: no push), each token's request sent before the forward for that token starts; the
    tokens equal those of in-process tables holding the same rows; `engram generate` does the same
    from the command line."""
    from trainer.cli import main
    from trainer.engram import LocalTables
    from trainer.infer import generate, load_checkpoint, service_tables

    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=4, warmup_steps=1, threads=1,
                  checkpoint=str(tmp_path / "remote.pt"))
    cluster = make_cluster(2)
    with cluster.client() as client:
        train(cfg, client=client, service=ServiceOptions(prefix="gen"))
        model, indexer, _, corpus = load_checkpoint(cfg.checkpoint, service_tables(client, "gen"))
        pushes = sum(c["push_requests"] for c in ray.get([a.counters.remote() for a in cluster.actors]))
        events = []
        model.register_forward_pre_hook(lambda m, a: events.append("forward"))
        client.trace = lambda kind, f: events.append(kind) if kind == "fetch_sent" else None
        prompt = torch.tensor([corpus.tokenizer.encode("def main(").ids] * 2)
        remote_tokens = generate(model, indexer, prompt, max_new_tokens=6)
        client.trace = None
        sizes = indexer.table_sizes()
        rows = remote_rows(client, "gen", sizes, step=cfg.steps)
        assert sum(c["push_requests"] for c in ray.get([a.counters.remote() for a in cluster.actors])) == pushes
    assert events.count("forward") == 6  # the prompt, then one per new token but the last
    starts = [i for i, e in enumerate(events) if e == "forward"]
    for previous, start in zip([-1] + starts, starts):
        assert "fetch_sent" in events[previous + 1:start]  # this forward's rows were requested first
    local = LocalTables(model.cfg.engram, sizes)
    with torch.no_grad():
        for layer, layer_rows in rows.items():
            local.embeddings[str(layer)].weight.copy_(torch.from_numpy(layer_rows))
    model.tables = local
    torch.testing.assert_close(generate(model, indexer, prompt, max_new_tokens=6), remote_tokens)

    address = ray.get_runtime_context().gcs_address
    capsys.readouterr()  # what training printed
    assert main(["generate", "--checkpoint", cfg.checkpoint, "--prompt", "def main(", "--max-new-tokens", "5",
                 "--address", address, "--cluster", cluster.config.name]) == 0
    assert capsys.readouterr().out.startswith("def main(")
    with pytest.raises(ValueError, match="trained through the table service"):
        load_checkpoint(cfg.checkpoint)


def test_training_sends_ngrams_for_collision_stats(make_cluster, corpus_dir, tmp_path):
    """With a collision sample rate the trainer's fetches carry the N-grams behind the row ids, and
    the shards count lookups of every table (tiny tables: most slots collide)."""
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=3, warmup_steps=1, threads=1)
    cluster = make_cluster(2)
    with cluster.client() as client:
        train(cfg, client=client, service=ServiceOptions(prefix="coll", collision_sample_rate=1.0))
        tables = [t for shard in client.stats() for t in shard.tables if t.name.startswith("coll/")]
    assert tables and all(t.HasField("collisions") and t.collisions.lookups > 0 for t in tables)
    assert sum(t.collisions.colliding_lookups for t in tables) > 0
