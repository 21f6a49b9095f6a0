"""The main job, `engram demo`: a small Engram model trained through the table service next to the
iso-FLOPs baseline, on the same data in the same run.

It starts the embedded local Ray cluster with the shards (or attaches to one with `--address`),
trains, prints both held-out losses, a sample generation read through the service, and each
shard's counters, writes the model checkpoint and a loss plot, and shuts down what it started.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from trainer.data import Corpus
from trainer.train import ServiceOptions, TrainConfig, TrainResult, train


@dataclass(frozen=True)
class DemoConfig:
    train: TrainConfig
    out_dir: str = "engram-demo"  # checkpoint and plot
    address: str | None = None  # None: the embedded local cluster
    cluster: str = "demo"
    shards: int = 2  # cold shards of the embedded cluster
    hot_shards: int = 1
    service: ServiceOptions = ServiceOptions(prefix="demo")
    eval_every: int = 20
    prompt: str = "def "
    max_new_tokens: int = 40
    top_k: int = 8  # a 60-step model's greedy text repeats itself; sampling (seeded) shows more


def run(cfg: DemoConfig) -> int:
    from memory_service.cluster import connect, start_local

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.load(cfg.train.corpus)
    print(corpus.summary(), flush=True)
    if cfg.address:
        cluster = connect(cfg.address, name=cfg.cluster)
    else:
        print(f"starting the embedded Ray cluster with {cfg.shards} cold and {cfg.hot_shards} hot table shards",
              flush=True)
        cluster = start_local(num_shards=cfg.shards, num_hot=cfg.hot_shards, name=cfg.cluster)
    try:
        with cluster.client() as client:
            engram_cfg = replace(cfg.train, checkpoint=str(out / "model.pt"))
            engram = train(engram_cfg, corpus, client=client, service=cfg.service, eval_every=cfg.eval_every)
            print(f"tokenizer compression: {engram.compression}")
            baseline_cfg = replace(cfg.train, model=cfg.train.model.iso_flops_baseline(), checkpoint=None,
                                   checkpoint_dir=None, checkpoint_every=0, resume_from=None)  # the Engram run's
            baseline = train(baseline_cfg, corpus, eval_every=cfg.eval_every)
            gain = 100 * (baseline.val_loss - engram.val_loss) / baseline.val_loss
            print(f"held-out loss after {cfg.train.steps} steps: Engram {engram.val_loss:.4f} "
                  f"(tables in the service, {engram.tokens_per_s:,.0f} tokens/s), baseline "
                  f"{baseline.val_loss:.4f} ({baseline.tokens_per_s:,.0f} tokens/s): {gain:+.1f}%")
            print(f"sample ({cfg.prompt!r}, top-{cfg.top_k} sampling, seed 0, rows read from the service):")
            print(sample(client, Path(engram_cfg.checkpoint), cfg), flush=True)
            print(shard_table(client.stats()))
        plot = plot_losses(engram, baseline, out / "loss.png")
        print(f"checkpoint: {engram_cfg.checkpoint}\nloss plot: {plot}")
    finally:
        if not cfg.address:
            cluster.shutdown()
    return 0


def sample(client, checkpoint: Path, cfg: DemoConfig) -> str:
    """A continuation of the prompt by the checkpoint's model, its rows read (never written)
    through the service."""
    from trainer.infer import generate_text, load_checkpoint, service_tables

    model, indexer, _, corpus = load_checkpoint(checkpoint, service_tables(client, cfg.service.prefix),
                                                cfg.train.device)
    room = model.cfg.context - len(corpus.tokenizer.encode(cfg.prompt).ids)  # prompt + new must fit
    return generate_text(model, indexer, corpus.tokenizer, cfg.prompt, min(cfg.max_new_tokens, room),
                         top_k=cfg.top_k, seed=0)


def shard_table(stats: list) -> str:
    """Each shard's requests and rows served, and what it stores."""
    lines = ["shard   step  fetches  rows fetched  pushes  rows pushed  rows stored      MB"]
    for s in stats:
        stored = sum(t.rows_materialized for t in s.tables)
        mb = sum(t.nbytes for t in s.tables) / 2**20
        step = max((t.step for t in s.tables), default=0)
        c = s.counters
        name = f"{s.role or 'cold'} {s.shard_id}"
        lines.append(f"{name:>6}  {step:>4}  {c.fetch_requests:>7,}  {c.fetch_rows:>12,}  {c.push_requests:>6,}  "
                     f"{c.push_rows:>11,}  {stored:>11,}  {mb:>6.1f}")
    return "\n".join(lines)


def plot_losses(engram: TrainResult, baseline: TrainResult, path: Path) -> Path:
    """Training loss per step and held-out loss of both models, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result, name, color in ((engram, "Engram (service)", "tab:blue"), (baseline, "baseline", "tab:orange")):
        ax.plot(range(1, len(result.train_losses) + 1), result.train_losses, color=color, alpha=0.5,
                label=f"{name}, train")
        steps, losses = zip(*result.val_losses)
        ax.plot(steps, losses, "o-", color=color, label=f"{name}, held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
