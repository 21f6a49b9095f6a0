"""Local training: the backbone with AdamW, the Engram tables with the table service's optimizer
(ENGRAM.md §4), applied in-process by trainer/table_optimizer.py.

By default the tables take dense-equivalent Adam (`adam`: what torch.optim.Adam on the dense table
would hold, at sparse cost); `sparse_adam` is torch's SparseAdam. One step counter per table,
learning rate `table_lr_mult` x the backbone's, no weight decay.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.data import Batches, Corpus, CorpusConfig, eval_batches
from memory_service.config import OPTIMIZERS, OptimizerConfig
from trainer.engram import LocalTables
from trainer.model import EngramLM, ModelConfig
from trainer.row_index import RowIndexer, identity_compression
from trainer.table_optimizer import TableOptimizer
from trainer.tokenizer_compression import TokenizerCompression


@dataclass(frozen=True)
class TrainConfig:
    """One local training run. `model` is a ModelConfig (a preset by default)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("tiny"))
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    table_lr_mult: float = 5.0
    # memory_service.config.OPTIMIZERS. "adam" (dense-equivalent) beat "sparse_adam" paired by seed
    # in bench/bench_quality.py (bench/results/quality.md).
    table_optimizer: str = "adam"
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    seed: int = 0
    compress_tokens: bool = True  # False: the no-compression ablation
    keep_whitespace_runs: bool = False
    eval_batches: int = 16
    threads: int | None = None
    checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.table_lr_mult <= 0:
            raise ValueError(f"lr {self.lr} and table_lr_mult {self.table_lr_mult} must be > 0")
        if self.table_optimizer not in OPTIMIZERS:
            raise ValueError(f"table_optimizer {self.table_optimizer!r} must be one of {OPTIMIZERS}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be in [0, steps={self.steps})")


@dataclass
class TrainResult:
    val_loss: float
    train_losses: list[float]
    seconds: float
    tokens_per_s: float
    compression: str


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio x lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build(cfg: TrainConfig, corpus: Corpus) -> tuple[EngramLM, RowIndexer | None, str]:
    """The model for `cfg` on `corpus`, its row indexer (None for a baseline), and a compression summary."""
    model_cfg = replace(cfg.model, vocab_size=corpus.vocab_size)
    indexer = build_indexer(cfg, corpus)
    if indexer is None:
        return EngramLM(model_cfg, seed=cfg.seed), None, "no Engram"
    tables = LocalTables(model_cfg.engram, indexer.table_sizes(), sparse=True)
    return EngramLM(model_cfg, tables, seed=cfg.seed), indexer, indexer.compression.summary()


def build_indexer(cfg: TrainConfig, corpus: Corpus) -> RowIndexer | None:
    """The row indexer of `cfg`'s Engram layers on `corpus`'s tokenizer (None for a baseline);
    inference builds it here too, so a loaded model hashes exactly as it was trained."""
    if cfg.model.engram is None:
        return None
    if cfg.compress_tokens:
        compression = TokenizerCompression.from_tokenizer(corpus.tokenizer, cfg.keep_whitespace_runs)
    else:
        compression = identity_compression(corpus.vocab_size)
    return RowIndexer(cfg.model.engram, compression, corpus.pad_id)


def make_optimizers(model: EngramLM, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW on the backbone (decay on matrices but the hyper-connection mix); the tables take
    `cfg.table_optimizer`, the same math the table service runs."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("tables.")]
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(".mix")]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and not n.endswith(".mix"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))]
    if model.tables is not None:
        optimizers.append(TableOptimizer(model.tables, OptimizerConfig(
            cfg.table_optimizer, lr=cfg.lr * cfg.table_lr_mult, beta1=0.9, beta2=0.95)))
    return optimizers


def loss_on(model: EngramLM, indexer: RowIndexer | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    row_ids = indexer(x) if indexer is not None else None
    logits = model(x, row_ids)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: EngramLM, indexer: RowIndexer | None, batches: list) -> float:
    """Mean held-out loss (nats/token) over fixed validation windows."""
    model.eval()
    losses = [loss_on(model, indexer, x, y).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, corpus: Corpus | None = None) -> TrainResult:
    """Train one model for cfg.steps and return its held-out loss."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = corpus or Corpus.load(cfg.corpus)
    model, indexer, summary = build(cfg, corpus)
    optimizers = make_optimizers(model, cfg)
    context = cfg.model.context
    batches = Batches(corpus.train, cfg.batch_size, context, seed=cfg.seed)
    held_out = eval_batches(corpus.val, cfg.batch_size, context, cfg.eval_batches)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="train", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(cfg, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * (cfg.table_lr_mult if isinstance(opt, TableOptimizer) else 1.0)
        x, y = batches.next()
        loss = loss_on(model, indexer, x, y)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.dense_parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{(step + 1) * x.numel() / elapsed:,.0f}")
    seconds = time.perf_counter() - start
    val_loss = evaluate(model, indexer, held_out)
    if cfg.checkpoint:
        save_checkpoint(cfg, model, optimizers, Path(cfg.checkpoint))
    return TrainResult(val_loss, losses, seconds, cfg.steps * cfg.batch_size * context / seconds, summary)


def save_checkpoint(cfg: TrainConfig, model: EngramLM, optimizers: list, path: Path) -> None:
    """Model, optimizer states and the config in one file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": asdict(cfg), "model": model.state_dict(),
                "optimizers": [opt.state_dict() for opt in optimizers]}, tmp)
    tmp.replace(path)
