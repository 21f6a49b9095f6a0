"""Training: the backbone with AdamW, the Engram tables with the table service's optimizer
(ENGRAM.md §4), in-process (trainer/local_table_optimizer.py) or on the shards of a table service
(trainer/remote_tables.py, given a `MemoryClient`). The loop is the same for both: batches come
from a `Prefetcher`, which hashes them and requests their rows ahead of the forward.

By default the tables take dense-equivalent Adam (`adam`: what torch.optim.Adam on the dense table
would hold, at sparse cost); `sparse_adam` is torch's SparseAdam. One step counter per table,
learning rate `table_lr_mult` x the backbone's, no weight decay.

Data-parallel (`rank` of `world` workers, torch.distributed initialised by the caller, e.g. Ray
Train): every worker draws the same batch and takes its slice; dense gradients are all-reduced
(mean), and each worker pushes its part of the table gradients scaled by 1/world, which the shards
sum and apply once per step.

`device` "cuda": the model, each batch (hashed there, so row ids never cross to the host) and
in-process tables live on the GPU; service tables deliver their rows there (copied from pinned
buffers on a side stream) and their gradients are copied back to the host for the push.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from trainer.data import Batches, Corpus, CorpusConfig, eval_batches
from memory_service.config import OPTIMIZERS, OptimizerConfig
from trainer.engram import EngramTables, LocalTables
from trainer.model import EngramLM, ModelConfig
from trainer.prefetch import Prefetcher
from trainer.remote_tables import RemoteTables
from trainer.row_indexer import RowIndexer, identity_compression
from trainer.run_state import Resume, RunState, save_run
from trainer.local_table_optimizer import TableOptimizer
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
    checkpoint: str | None = None  # the trained model, written at the end (what `engram generate` reads)
    # Checkpoints to resume from (tables, dense model and optimizers, data position: trainer/run_state.py):
    checkpoint_dir: str | None = None  # written to <checkpoint_dir>/step-NNNNNNNN
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    resume_from: str | None = None  # a checkpoint, or a checkpoint_dir (its latest), to continue from
    progress: bool = True
    device: str = "cpu"  # "cpu" or "cuda": where the model, batches and in-process tables live

    def __post_init__(self) -> None:
        check_device(self.device)
        for name in ("steps", "batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.table_lr_mult <= 0:
            raise ValueError(f"lr {self.lr} and table_lr_mult {self.table_lr_mult} must be > 0")
        if self.table_optimizer not in OPTIMIZERS:
            raise ValueError(f"table_optimizer {self.table_optimizer!r} must be one of {OPTIMIZERS}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be in [0, steps={self.steps})")
        if self.checkpoint_every < 0 or (self.checkpoint_every and not self.checkpoint_dir):
            raise ValueError(f"checkpoint_every {self.checkpoint_every} must be >= 0, and > 0 needs a checkpoint_dir")


DEVICES = ("cpu", "cuda")


def check_device(device: str) -> None:
    """ValueError unless `device` is one of DEVICES and there: "cuda" needs a CUDA build of torch
    and a visible GPU."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} must be one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' needs a GPU, and torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")


@dataclass(frozen=True)
class ServiceOptions:
    """How a run reads and writes tables that live in the table service. `staleness` 0 is exact
    (each fetch sees every earlier push: the result of local training); k > 0 lets a fetch miss
    the last k pushes so the look-ahead fetch needs no wait."""

    prefix: str = "engram"  # the run's tables are "<prefix>/layer<i>/head<h>"
    prefetch: bool = True  # False: rows are fetched when the forward reaches the Engram layer
    collision_sample_rate: float = 0.0  # > 0: fetches carry N-gram fingerprints for collision stats
    lookahead: bool = True  # also request the next step's rows during this step
    staleness: int = 0
    announce: int = 6  # steps beyond the next whose row ids are announced to placement (a hint)

    def __post_init__(self) -> None:
        if self.staleness < 0 or self.announce < 0:
            raise ValueError(f"staleness {self.staleness} and announce {self.announce} must be >= 0")


@dataclass
class TrainResult:
    val_loss: float
    train_losses: list[float]
    seconds: float
    tokens_per_s: float
    compression: str
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss) along the run


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio x lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# (Engram config, {layer: prime size of each (order, head) table}) -> the tables a model reads
TablesFactory = Callable[["EngramConfig", dict[int, list[int]]], EngramTables]


def build(cfg: TrainConfig, corpus: Corpus, make_tables: TablesFactory | None = None
          ) -> tuple[EngramLM, RowIndexer | None, str]:
    """The model for `cfg` on `corpus`, its row indexer (None for a baseline), and a compression
    summary. `make_tables(engram_cfg, sizes)` gives the tables (default: in-process)."""
    model_cfg = replace(cfg.model, vocab_size=corpus.vocab_size)
    indexer = build_indexer(cfg, corpus)
    if indexer is None:
        return EngramLM(model_cfg, seed=cfg.seed), None, "no Engram"
    make_tables = make_tables or (lambda engram, sizes: LocalTables(engram, sizes, sparse=True))
    tables = make_tables(model_cfg.engram, indexer.table_sizes())
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


def table_optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    """The tables' optimizer; its lr is the peak rate (each step carries the scheduled one)."""
    return OptimizerConfig(cfg.table_optimizer, lr=cfg.lr * cfg.table_lr_mult, beta1=0.9, beta2=0.95)


def remote_tables(client, cfg: TrainConfig, service: ServiceOptions = ServiceOptions(), world: int = 1,
                  read_only: bool = False) -> TablesFactory:
    """A factory of `RemoteTables` on `client`'s service, created there (or attached to)."""
    def make(engram, sizes) -> RemoteTables:
        return RemoteTables(client, engram, sizes, table_optimizer_config(cfg), prefix=service.prefix,
                            read_only=read_only, contributors=world, grad_scale=1.0 / world,
                            collision_sample_rate=service.collision_sample_rate).create()
    return make


def make_optimizers(model: EngramLM, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW on the backbone (decay on matrices but the hyper-connection mix); the tables take
    `cfg.table_optimizer`, the same math the table service runs."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("tables.")]
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(".mix")]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and not n.endswith(".mix"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))]
    if isinstance(model.tables, LocalTables):  # remote tables are optimised on the shards
        optimizers.append(TableOptimizer(model.tables, table_optimizer_config(cfg)))
    return optimizers


@torch.no_grad()
def evaluate(model: EngramLM, indexer: RowIndexer | None, batches: list) -> float:
    """Mean held-out loss (nats/token) over fixed validation windows (all their rows requested
    first), on the model's device."""
    model.eval()
    device = model.embed.weight.device
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    row_ids = [indexer(x) if indexer is not None else None for x, _ in batches]
    if indexer is not None:
        for ids in row_ids:
            model.tables.prefetch(ids)
    losses = []
    for (x, y), ids in zip(batches, row_ids):
        logits = model(x, ids)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, corpus: Corpus | None = None, client=None,
          service: ServiceOptions = ServiceOptions(), rank: int = 0, world: int = 1,
          eval_every: int = 0, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train one model for cfg.steps and return its held-out loss. With `client` (a MemoryClient)
    the tables live in its service; `rank`/`world` make this one of `world` data-parallel workers.
    `eval_every` > 0 also records the held-out loss every that many steps (rank 0); `on_step(step)`
    is called as each step ends (benchmarks time steps with it)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {world} workers")
    corpus = corpus or Corpus.load(cfg.corpus)
    resume = Resume.open(cfg.resume_from, client) if cfg.resume_from else None
    if resume is not None:
        _check_resumable(resume.state, cfg, service if client is not None else None)
        if world == 1:  # K workers: their driver restored the tables once (train_workers)
            resume.restore_tables(client)  # before the model attaches to them
    make_tables = remote_tables(client, cfg, service, world) if client is not None else None
    model, indexer, summary = build(cfg, corpus, make_tables)
    device = torch.device(cfg.device)
    model.to(device)  # before the optimizers: they hold the parameters' device
    tables = model.tables if isinstance(model.tables, RemoteTables) else None
    optimizers = make_optimizers(model, cfg)
    context = cfg.model.context
    batches = Batches(corpus.train, cfg.batch_size, context, seed=cfg.seed)
    run = _resumed(resume, model, optimizers, batches, tables) if resume else RunState(0, batches.state_dict())
    part = cfg.batch_size // world
    drawn, data_states = iter(range(run.step, cfg.steps + 1)), {}  # step -> batch order before its batch
    announce = service.announce if service.prefetch else 0  # batches drawn beyond the look-ahead

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        step = next(drawn)
        data_states[step] = batches.state_dict()  # step s + 1 (+ announce) is drawn during step s
        data_states.pop(step - 2 - announce, None)
        x, y = batches.next()  # every worker draws the whole batch and keeps its slice
        x, y = x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]
        return x.to(device), y.to(device)  # hashed where the model runs

    feed = Prefetcher(next_batch, cfg.steps, indexer, model.tables if service.prefetch else None,
                      service.prefetch and service.lookahead, service.staleness, announce)
    held_out = eval_batches(corpus.val, cfg.batch_size, context, cfg.eval_batches)
    losses: list[float] = run.train_losses
    val_losses: list[tuple[int, float]] = run.val_losses
    start = time.perf_counter()
    bar = tqdm(range(run.step, cfg.steps), disable=not cfg.progress or rank != 0, desc="train", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(cfg, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * (cfg.table_lr_mult if isinstance(opt, TableOptimizer) else 1.0)
        batch = feed.next(step)
        if tables is not None:
            tables.begin_step(step, lr * cfg.table_lr_mult)
        logits = model(batch.x, batch.row_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten())
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()  # remote tables push their gradients from inside it
        if tables is not None:
            tables.end_step()
        if world > 1:
            loss = _all_reduce_mean(model.dense_parameters(), loss.detach(), world)
        torch.nn.utils.clip_grad_norm_(model.dense_parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
        if eval_every and rank == 0 and (step + 1) % eval_every == 0 and step + 1 < cfg.steps:
            val_losses.append((step + 1, evaluate(model, indexer, held_out)))
        if cfg.checkpoint_every and rank == 0 and (step + 1) % cfg.checkpoint_every == 0:
            if tables is not None:
                tables.flush()  # the step's pushes applied: the shards are at step + 1
            data = data_states.get(step + 1, batches.state_dict())  # drawn ahead, or not yet
            save_run(cfg.checkpoint_dir, client, model, optimizers,
                     RunState(step + 1, data, losses, val_losses, torch.get_rng_state(), asdict(cfg),
                              asdict(service) if tables is not None else None))
        elapsed = time.perf_counter() - start
        postfix = dict(loss=f"{losses[-1]:.3f}",
                       tok_s=f"{(step + 1 - run.step) * cfg.batch_size * context / elapsed:,.0f}")
        if tables is not None:
            postfix["fetch_wait_ms"] = f"{1e3 * tables.times.wait_s / max(1, tables.times.fetches):.1f}"
        bar.set_postfix(postfix)
    seconds = time.perf_counter() - start
    steps_run = cfg.steps - run.step
    if tables is not None:
        tables.flush()  # the last step's push and commit, before the evaluation reads
    val_loss = evaluate(model, indexer, held_out) if rank == 0 else float("nan")
    val_losses.append((cfg.steps, val_loss))
    if tables is not None:
        tables.close()
    if cfg.checkpoint and rank == 0:
        save_checkpoint(cfg, model, optimizers, Path(cfg.checkpoint), service if tables is not None else None)
    return TrainResult(val_loss, losses, seconds, steps_run * cfg.batch_size * context / seconds, summary,
                       val_losses)


def _resumed(resume: Resume, model: EngramLM, optimizers: list, batches: Batches,
             tables: RemoteTables | None) -> RunState:
    """The checkpoint's run state, its weights, optimizer states, batch order and RNG loaded."""
    run = resume.load(model, optimizers)
    if tables is not None and tables.steps_pushed != run.step:
        raise RuntimeError(f"the service's tables are at step {tables.steps_pushed}, the checkpoint at "
                           f"{run.step}: restore its tables first")
    batches.load_state_dict(run.data)
    torch.set_rng_state(run.torch_rng)
    return run


def _check_resumable(run: RunState, cfg: TrainConfig, service: ServiceOptions | None) -> None:
    """ValueError unless this run can continue the checkpoint's."""
    if not run.step < cfg.steps:
        raise ValueError(f"the checkpoint is at step {run.step}: nothing left to train in steps={cfg.steps}")
    saved_prefix = (run.service or {}).get("prefix")
    if service is not None and saved_prefix != service.prefix:
        raise ValueError(f"the checkpoint's tables are {saved_prefix}/..., this run's {service.prefix}/...: "
                         f"resume with --prefix {saved_prefix}")


def _all_reduce_mean(params: list[torch.Tensor], loss: torch.Tensor, world: int) -> torch.Tensor:
    """Averages the dense gradients (one flat all-reduce) and the loss over the workers."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1]


def save_checkpoint(cfg: TrainConfig, model: EngramLM, optimizers: list, path: Path,
                    service: ServiceOptions | None = None) -> None:
    """Model, optimizer states and the config in one file, written atomically. Tables that live
    in the service stay there: the checkpoint names them (`service`), for a reader to attach."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"config": asdict(cfg), "model": model.state_dict(),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "service": asdict(service) if service is not None else None}, tmp)
    tmp.replace(path)
