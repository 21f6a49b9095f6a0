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

from trainer.data import Batches, Corpus, CorpusConfig, eval_batches
from memory_service.config import OPTIMIZERS, OptimizerConfig
from trainer.engram import EngramConfig, EngramTables, LocalTables
from trainer.model import EngramLM, ModelConfig
from trainer.prefetch import Prefetcher, Prepared
from trainer.progress import progress
from trainer.remote_tables import RemoteTables
from trainer.row_indexer import RowIndexer, identity_compression
from trainer.run_state import Resume, RunState, save_run
from trainer.local_table_optimizer import LocalTableOptimizer
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
TablesFactory = Callable[[EngramConfig, dict[int, list[int]]], EngramTables]


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
        optimizers.append(LocalTableOptimizer(model.tables, table_optimizer_config(cfg)))
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
    loop = _TrainLoop(cfg, corpus or Corpus.load(cfg.corpus), client, service, rank, world)
    bar = progress(range(loop.run.step, cfg.steps), "train", disable=not cfg.progress or rank != 0)
    for step in bar:
        loop.train_step(step)
        if on_step is not None:
            on_step(step)
        if eval_every and rank == 0 and (step + 1) % eval_every == 0 and step + 1 < cfg.steps:
            loop.record_val_loss(step + 1)
        if cfg.checkpoint_every and rank == 0 and (step + 1) % cfg.checkpoint_every == 0:
            loop.checkpoint(step + 1)
        bar.set_postfix(loop.progress(step))
    return loop.finish()


class _TrainLoop:
    """What a run carries from step to step, and a step's parts: `train` schedules these calls."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus, client, service: ServiceOptions, rank: int, world: int):
        """The model, its optimizers and the batch feed, at the step of `cfg.resume_from` if set."""
        self.cfg, self.client, self.service, self.rank, self.world = cfg, client, service, rank, world
        resume = _open_resume(cfg, client, service, world)
        make_tables = remote_tables(client, cfg, service, world) if client is not None else None
        self.model, self.indexer, self.summary = build(cfg, corpus, make_tables)
        self.device = torch.device(cfg.device)
        self.model.to(self.device)  # before the optimizers: they hold the parameters' device
        self.tables = self.model.tables if isinstance(self.model.tables, RemoteTables) else None
        self.optimizers = make_optimizers(self.model, cfg)
        self.batches = Batches(corpus.train, cfg.batch_size, cfg.model.context, seed=cfg.seed)
        self.run = (_resumed(resume, self.model, self.optimizers, self.batches, self.tables) if resume
                    else RunState(0, self.batches.state_dict()))
        self.drawn = iter(range(self.run.step, cfg.steps + 1))
        self.data_states: dict[int, dict] = {}  # step -> batch order before its batch
        self.announce = service.announce if service.prefetch else 0  # batches drawn beyond the look-ahead
        self.feed = Prefetcher(self._next_batch, cfg.steps, self.indexer,
                               self.model.tables if service.prefetch else None,
                               service.prefetch and service.lookahead, service.staleness, self.announce)
        self.held_out = eval_batches(corpus.val, cfg.batch_size, cfg.model.context, cfg.eval_batches)
        self.losses: list[float] = self.run.train_losses
        self.val_losses: list[tuple[int, float]] = self.run.val_losses
        self.start = time.perf_counter()

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's slice of the next batch, on the device; the batch order before it is kept,
        for a checkpoint taken while later batches are already drawn."""
        step = next(self.drawn)
        self.data_states[step] = self.batches.state_dict()  # step s + 1 (+ announce) is drawn during step s
        self.data_states.pop(step - 2 - self.announce, None)
        x, y = self.batches.next()  # every worker draws the whole batch and keeps its slice
        part = self.cfg.batch_size // self.world
        x, y = x[self.rank * part:(self.rank + 1) * part], y[self.rank * part:(self.rank + 1) * part]
        return x.to(self.device), y.to(self.device)  # hashed where the model runs

    def train_step(self, step: int) -> None:
        """One step at the scheduled rate: gradients (the workers' mean), clipped, applied; loss kept."""
        lr = self._set_lr(step)
        batch = self.feed.next(step)
        loss = self._backward(step, batch, lr)
        if self.world > 1:
            loss = _all_reduce_mean(self.model.dense_parameters(), loss.detach(), self.world)
        torch.nn.utils.clip_grad_norm_(self.model.dense_parameters(), 1.0)
        for opt in self.optimizers:
            opt.step()
        self.losses.append(loss.item())

    def _set_lr(self, step: int) -> float:
        """Sets the step's rate in every optimizer (x `table_lr_mult` for the tables); returns it."""
        lr = lr_at(self.cfg, step)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * (self.cfg.table_lr_mult if isinstance(opt, LocalTableOptimizer) else 1.0)
        return lr

    def _backward(self, step: int, batch: Prepared, lr: float) -> torch.Tensor:
        """The batch's loss, its gradients left in every parameter; remote tables are told the step
        and their rate first (`begin_step`) and that its pushes are done after (`end_step`)."""
        if self.tables is not None:
            self.tables.begin_step(step, lr * self.cfg.table_lr_mult)
        logits = self.model(batch.x, batch.row_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten())
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()  # remote tables push their gradients from inside it
        if self.tables is not None:
            self.tables.end_step()
        return loss

    def record_val_loss(self, steps_done: int) -> None:
        """The held-out loss after `steps_done` steps, kept for the result's curve."""
        self.val_losses.append((steps_done, evaluate(self.model, self.indexer, self.held_out)))

    def checkpoint(self, steps_done: int) -> None:
        """What a later run continues from after `steps_done` steps (trainer/run_state.py)."""
        if self.tables is not None:
            self.tables.flush()  # the step's pushes applied: the shards are at step + 1
        data = self.data_states.get(steps_done, self.batches.state_dict())  # drawn ahead, or not yet
        save_run(self.cfg.checkpoint_dir, self.client, self.model, self.optimizers,
                 RunState(steps_done, data, self.losses, self.val_losses, torch.get_rng_state(), asdict(self.cfg),
                          asdict(self.service) if self.tables is not None else None),
                 tables=[t.name for t in self.tables.configs] if self.tables is not None else ())

    def progress(self, step: int) -> dict[str, str]:
        """The bar's figures after `step`: loss, tokens/s, remote tables' mean wait per fetch."""
        elapsed = time.perf_counter() - self.start
        tokens = (step + 1 - self.run.step) * self.cfg.batch_size * self.cfg.model.context
        postfix = dict(loss=f"{self.losses[-1]:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
        if self.tables is not None:
            postfix["fetch_wait_ms"] = f"{1e3 * self.tables.times.wait_s / max(1, self.tables.times.fetches):.1f}"
        return postfix

    def finish(self) -> TrainResult:
        """The last pushes applied, the final held-out loss, tables closed, the model saved."""
        cfg, tables = self.cfg, self.tables
        seconds = time.perf_counter() - self.start
        steps_run = cfg.steps - self.run.step
        if tables is not None:
            tables.flush()  # the last step's push and commit, before the evaluation reads
        val_loss = evaluate(self.model, self.indexer, self.held_out) if self.rank == 0 else float("nan")
        self.val_losses.append((cfg.steps, val_loss))
        if tables is not None:
            tables.close()
        if cfg.checkpoint and self.rank == 0:
            save_checkpoint(cfg, self.model, self.optimizers, Path(cfg.checkpoint),
                            self.service if tables is not None else None)
        return TrainResult(val_loss, self.losses, seconds, steps_run * cfg.batch_size * cfg.model.context / seconds,
                           self.summary, self.val_losses)


def _open_resume(cfg: TrainConfig, client, service: ServiceOptions, world: int) -> Resume | None:
    """The checkpoint `cfg.resume_from` names (None: none), checked, its tables restored."""
    if not cfg.resume_from:
        return None
    resume = Resume.open(cfg.resume_from, client)
    _check_resumable(resume.state, cfg, service if client is not None else None)
    if world == 1:  # K workers: their driver restored the tables once (train_workers)
        resume.restore_tables(client)  # before the model attaches to them
    return resume


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
