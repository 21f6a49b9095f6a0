"""The commands that train or run a model: `train-local`, `train` (through a running tables
cluster, optionally on Ray Train workers), `demo` and `generate`. Torch and the trainer load inside
the command functions, after `colocation.apply()` (trainer/cli/__init__.py), never at `--help`."""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

from trainer.cli.options import (CLIENT_ADDRESS_HELP, CommandError, add_client_security_args, add_cluster_args,
                                 client_security, client_settings, non_negative_int, positive_float, positive_int,
                                 ray_address)

# trainer.model.MODEL_PRESETS and trainer.train.DEVICES, spelled here so the parser needs no torch
# (tests/trainer/test_cli.py checks that they agree)
PRESETS = ("demo", "tiny")
DEVICES = ("cpu", "cuda")


def add_train_args(p: argparse.ArgumentParser, steps: int, context: int | None = None,
                   table_lr_mult: float = 5.0) -> None:
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="model size preset")
    p.add_argument("--steps", type=positive_int, default=steps)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--context", type=positive_int, default=context,
                   help="tokens per sequence (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="backbone learning rate (tables get 5x)")
    p.add_argument("--table-lr-mult", type=positive_float, default=table_lr_mult,
                   help="table learning rate / backbone's (ENGRAM.md: 5; bench_quality found 50 best here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="folder of text/source files (default: Python stdlib)")
    p.add_argument("--threads", type=positive_int, default=None)
    add_device_arg(p)
    p.add_argument("--checkpoint", default=None, help="write the trained model here")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save checkpoints to resume from here, in step-NNNNNNNN folders (with --checkpoint-every)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="steps between checkpoints (0: none)")
    p.add_argument("--resume-from", default=None,
                   help="continue from this checkpoint, or from the latest in this --checkpoint-dir")
    p.add_argument("--no-engram", action="store_true", help="train the iso-FLOPs baseline instead")
    p.add_argument("--no-compression", action="store_true", help="hash raw token ids")
    p.add_argument("--keep-whitespace-runs", action="store_true",
                   help="tokenizer compression keeps whitespace runs (indentation) distinct")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="where the model, its batches and in-process tables live")


def add_service_args(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("--prefix", default=prefix, help="this run's tables are <prefix>/layer<i>/head<h>")
    p.add_argument("--staleness", type=non_negative_int, default=0,
                   help="0: exact (each fetch sees every earlier push); k: fetches may miss the last k pushes")
    p.add_argument("--no-lookahead", action="store_true", help="do not request the next step's rows early")
    p.add_argument("--announce", type=non_negative_int, default=6,
                   help="steps beyond the next whose row ids are announced to the shards' placement (0: none)")
    p.add_argument("--collision-sample-rate", type=float, default=0.0,
                   help="share of table slots whose N-grams the shards track for `engram stats` (0: off)")


def train_config(args: argparse.Namespace):
    from trainer.data import CorpusConfig
    from trainer.model import ModelConfig
    from trainer.train import TrainConfig

    model = ModelConfig.from_name(args.preset)
    if args.context:
        model = replace(model, context=args.context)
    if args.no_engram:
        model = model.iso_flops_baseline()
    # absolute: Ray Train workers run in a folder of Ray's session, where a relative path is lost
    corpus, checkpoint, checkpoint_dir, resume_from = (
        os.path.abspath(p) if p else None
        for p in (args.corpus, args.checkpoint, args.checkpoint_dir, args.resume_from))
    return TrainConfig(model=model, corpus=CorpusConfig(corpus_dir=corpus), steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, table_lr_mult=args.table_lr_mult,
                       seed=args.seed, threads=args.threads, device=args.device,
                       warmup_steps=min(20, args.steps // 10), checkpoint=checkpoint,
                       checkpoint_dir=checkpoint_dir, checkpoint_every=args.checkpoint_every,
                       resume_from=resume_from,
                       compress_tokens=not args.no_compression,
                       keep_whitespace_runs=args.keep_whitespace_runs)


def service_options(args: argparse.Namespace):
    from trainer.train import ServiceOptions

    return ServiceOptions(prefix=args.prefix, lookahead=not args.no_lookahead, staleness=args.staleness,
                          announce=args.announce, collision_sample_rate=args.collision_sample_rate)


def cmd_train_local(args: argparse.Namespace) -> int:
    from trainer.data import Corpus
    from trainer.train import train

    cfg = train_config(args)
    corpus = Corpus.load(cfg.corpus)
    print(corpus.summary())
    result = train(cfg, corpus)
    print(f"tokenizer compression: {result.compression}")
    _report(cfg, result)
    return 0


def _report(cfg, result, workers: str = "") -> None:
    """The run's last lines: held-out loss, speed, and where the model went."""
    print(f"held-out loss {result.val_loss:.4f} nats/token after {cfg.steps} steps "
          f"({result.tokens_per_s:,.0f} tokens/s{workers})")
    if cfg.checkpoint:
        print(f"checkpoint: {cfg.checkpoint}")


def cmd_train(args: argparse.Namespace) -> int:
    """Train through a running tables cluster: in this process, or on `--workers` Ray Train workers."""
    name, tls_ca = client_settings(args)
    address = ray_address(args.address)
    security = client_security(args, tls_ca)
    from memory_service.cluster import connect

    cluster = connect(address, name=name)  # before torch loads: a missing cluster is said at once
    print(f"attached to {len(cluster.addresses)} shards of tables cluster {name!r}", flush=True)
    try:
        from trainer.data import Corpus
        from trainer.distributed import train_workers
        from trainer.train import train

        cfg, service = train_config(args), service_options(args)
        if args.workers > 1:
            Corpus.load(cfg.corpus)  # prepare the cached corpus once, before the workers read it
            result = train_workers(cfg, args.workers, name, service, use_gpu=args.gpu,
                                   resource=args.worker_resource, security=security)
        else:
            with cluster.client(security=security) as client:
                result = train(cfg, client=client, service=service)
    finally:
        cluster.shutdown()
    _report(cfg, result, f", {args.workers} worker(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    from trainer.demo import DemoConfig, run

    if importlib.util.find_spec("matplotlib") is None:  # now, not after minutes of training
        raise CommandError("the demo's loss plot needs matplotlib: pip install 'engram-memory[demo]'")

    if args.address:
        ray_address(args.address)  # a dead address fails now, not after loading the corpus
    return run(DemoConfig(train=train_config(args), out_dir=args.out, address=args.address,
                          cluster=args.name, shards=args.shards, service=service_options(args)))


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the prompt and its continuation by a trained checkpoint; with `--address`, its rows
    are read from the tables cluster it was trained through."""
    from trainer.infer import generate_text, load_checkpoint, saved_model

    if args.address is None:
        model, indexer, _, corpus = load_checkpoint(args.checkpoint, device=args.device)
        print(generate_text(model, indexer, corpus.tokenizer, args.prompt, args.max_new_tokens,
                            top_k=args.top_k, temperature=args.temperature, seed=args.seed))
        return 0
    name, tls_ca = client_settings(args)
    address = ray_address(args.address)
    from memory_service.cluster import connect
    from trainer.infer import service_tables

    service = saved_model(args.checkpoint).get("service") or {}
    cluster = connect(address, name=name)
    try:
        with cluster.client(security=client_security(args, tls_ca)) as client:
            prefix = args.prefix or service.get("prefix", "engram")
            model, indexer, _, corpus = load_checkpoint(args.checkpoint, service_tables(client, prefix), args.device)
            print(generate_text(model, indexer, corpus.tokenizer, args.prompt, args.max_new_tokens,
                                top_k=args.top_k, temperature=args.temperature, seed=args.seed))
    finally:
        cluster.shutdown()
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train-local", help="train a model with in-process Engram tables")
    add_train_args(p, steps=200)
    p.set_defaults(func=cmd_train_local)

    p = sub.add_parser("train", help="train through a running tables cluster")
    add_train_args(p, steps=200)
    add_cluster_args(p, CLIENT_ADDRESS_HELP)
    p.add_argument("--workers", type=positive_int, default=1,
                   help="data-parallel Ray Train workers (> 1: TorchTrainer)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--worker-resource", default=None,
                   help="custom Ray resource each worker takes one unit of (deploy/: engram_trainer)")
    add_service_args(p, prefix="engram")
    add_client_security_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the main job: an Engram model trained through the table service vs the baseline")
    add_train_args(p, steps=60, context=128, table_lr_mult=50.0)
    p.add_argument("--address", default=None,
                   help="Ray cluster whose tables cluster --name to use (default: start an embedded one, or "
                        "attach to $RAY_ADDRESS)")
    p.add_argument("--name", "--cluster", dest="name", default="demo", help="tables cluster name")
    p.add_argument("--shards", type=positive_int, default=2, help="shards of the embedded cluster")
    p.add_argument("--out", default="engram-demo", help="folder for the checkpoint and the loss plot")
    add_service_args(p, prefix="demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a file written by train-local, train or demo (--checkpoint), or a checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="prompt + new tokens must fit the context")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k most likely tokens (0: greedy)")
    p.add_argument("--temperature", type=positive_float, default=1.0,
                   help="divides the logits before top-k sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device_arg(p)
    add_cluster_args(p, "Ray cluster whose tables hold the rows (checkpoints of `engram train`/`demo`; "
                        "default: the rows saved in the checkpoint)")
    p.add_argument("--prefix", default=None, help="table prefix (default: the checkpoint's)")
    add_client_security_args(p)
    p.set_defaults(func=cmd_generate)
