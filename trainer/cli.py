"""The `engram` command. It parses argv into config dataclasses and calls plain functions; it is the
top layer, so the table service never imports the trainer."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from trainer import colocation

colocation.apply()  # before torch loads: the embedded cluster's shards share these cores

from trainer.data import Corpus, CorpusConfig  # noqa: E402
from trainer.infer import generate_text, load_checkpoint, saved_model  # noqa: E402
from trainer.model import MODEL_PRESETS, ModelConfig  # noqa: E402
from trainer.train import DEVICES, TrainConfig, train  # noqa: E402

if TYPE_CHECKING:
    from memory_service.wire.security import ClientSecurity, SecurityConfig


def add_train_args(p: argparse.ArgumentParser, steps: int, context: int | None = None,
                   table_lr_mult: float = 5.0) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model size preset")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=context, help="tokens per sequence (default: the preset's)")
    p.add_argument("--lr", type=float, default=3e-3, help="backbone learning rate (tables get 5x)")
    p.add_argument("--table-lr-mult", type=float, default=table_lr_mult,
                   help="table learning rate / backbone's (ENGRAM.md: 5; bench_quality found 50 best here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="folder of text/source files (default: Python stdlib)")
    p.add_argument("--threads", type=int, default=None)
    add_device_arg(p)
    p.add_argument("--checkpoint", default=None, help="write the trained model here")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save checkpoints to resume from here, in step-NNNNNNNN folders (with --checkpoint-every)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--resume-from", default=None,
                   help="continue from this checkpoint, or from the latest in this --checkpoint-dir")
    p.add_argument("--no-engram", action="store_true", help="train the iso-FLOPs baseline instead")
    p.add_argument("--no-compression", action="store_true", help="hash raw token ids")
    p.add_argument("--keep-whitespace-runs", action="store_true",
                   help="tokenizer compression keeps whitespace runs (indentation) distinct")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="where the model, its batches and in-process tables live")


def train_config(args: argparse.Namespace) -> TrainConfig:
    model = ModelConfig.from_name(args.preset)
    if args.context:
        model = replace(model, context=args.context)
    if args.no_engram:
        model = model.iso_flops_baseline()
    return TrainConfig(model=model, corpus=CorpusConfig(corpus_dir=args.corpus), steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, table_lr_mult=args.table_lr_mult,
                       seed=args.seed, threads=args.threads, device=args.device,
                       warmup_steps=min(20, args.steps // 10), checkpoint=args.checkpoint,
                       checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                       resume_from=args.resume_from,
                       compress_tokens=not args.no_compression,
                       keep_whitespace_runs=args.keep_whitespace_runs)


def cmd_train_local(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    corpus = Corpus.load(cfg.corpus)
    print(corpus.summary())
    result = train(cfg, corpus)
    print(f"tokenizer compression: {result.compression}")
    print(f"held-out loss {result.val_loss:.4f} nats/token after {cfg.steps} steps "
          f"({result.tokens_per_s:,.0f} tokens/s)")
    if cfg.checkpoint:
        print(f"checkpoint: {cfg.checkpoint}")
    return 0


def add_service_args(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("--name", "--cluster", dest="cluster", default="default",
                   help="name of the tables cluster to attach to (as given to engram serve --name)")
    p.add_argument("--prefix", default=prefix, help="this run's tables are <prefix>/layer<i>/head<h>")
    p.add_argument("--staleness", type=int, default=0,
                   help="0: exact (each fetch sees every earlier push); k: fetches may miss the last k pushes")
    p.add_argument("--no-lookahead", action="store_true", help="do not request the next step's rows early")
    p.add_argument("--announce", type=int, default=6,
                   help="steps beyond the next whose row ids are announced to the shards' placement (0: none)")
    p.add_argument("--collision-sample-rate", type=float, default=0.0,
                   help="share of table slots whose N-grams the shards track for `engram stats` (0: off)")


def service_options(args: argparse.Namespace):
    from trainer.train import ServiceOptions

    return ServiceOptions(prefix=args.prefix, lookahead=not args.no_lookahead, staleness=args.staleness,
                          announce=args.announce,
                          collision_sample_rate=args.collision_sample_rate)


def add_client_security_args(p: argparse.ArgumentParser) -> None:
    """TLS and token of a client of secured shards; the token comes from $ENGRAM_TOKEN (a token
    on the command line would show in `ps`)."""
    p.add_argument("--tls-ca", default=None, help="PEM of the CA that signed the shards' certificates (turns TLS on)")
    p.add_argument("--tls-cert", default=None, help="this client's certificate (PEM), for shards that require one")
    p.add_argument("--tls-key", default=None, help="this client's private key (PEM)")
    p.add_argument("--tls-server-name", default=None, help="name the shards' certificates carry, if not their address")


def client_security(args: argparse.Namespace) -> "ClientSecurity | None":
    """ClientSecurity from the TLS flags and $ENGRAM_TOKEN, or None when neither is given."""
    from memory_service.wire.security import ClientSecurity

    token = os.environ.get("ENGRAM_TOKEN") or None
    if not (args.tls_ca or args.tls_cert or token):
        return None
    return ClientSecurity(root_cert=args.tls_ca, token=token, client_cert=args.tls_cert, client_key=args.tls_key,
                          server_name=args.tls_server_name)


def server_security(args: argparse.Namespace) -> "SecurityConfig | None":
    """SecurityConfig of `engram serve` from its TLS flags and the comma-separated tokens in
    $ENGRAM_READ_TOKENS / $ENGRAM_WRITE_TOKENS; None (open) when neither is given. Hot shards
    reach the cold ones with the first write token, the shard certificate as client certificate
    (mutual TLS) and --tls-ca (or the certificate itself, when self-signed) as root."""
    from memory_service.wire.security import ClientSecurity, SecurityConfig

    read, write = ([t for t in os.environ.get(var, "").split(",") if t]
                   for var in ("ENGRAM_READ_TOKENS", "ENGRAM_WRITE_TOKENS"))
    if not (args.tls_cert or read or write):
        return None
    if read and not write:
        raise SystemExit("engram serve: $ENGRAM_READ_TOKENS without $ENGRAM_WRITE_TOKENS: nothing could write, "
                         "not even the shards' own migration")
    mutual = args.tls_client_ca is not None
    peer = ClientSecurity(root_cert=(args.tls_ca or args.tls_cert) if args.tls_cert else None,
                          token=write[0] if write else None,
                          client_cert=args.tls_cert if mutual else None, client_key=args.tls_key if mutual else None)
    return SecurityConfig.from_tokens(read, write, cert=args.tls_cert, key=args.tls_key,
                                      client_ca=args.tls_client_ca, peer=peer)


def cmd_train(args: argparse.Namespace) -> int:
    """Train through a running tables cluster: in this process, or on `--workers` Ray Train workers."""
    from memory_service.cluster import connect
    from trainer.distributed import train_workers

    cfg = train_config(args)
    service = service_options(args)
    cluster = connect(args.address, name=args.cluster)
    print(f"attached to {len(cluster.addresses)} shards of tables cluster {args.cluster!r}", flush=True)
    try:
        if args.workers > 1:
            Corpus.load(cfg.corpus)  # prepare the cached corpus once, before the workers read it
            result = train_workers(cfg, args.workers, args.cluster, service, use_gpu=args.gpu,
                                   resource=args.worker_resource, security=client_security(args))
        else:
            with cluster.client(security=client_security(args)) as client:
                result = train(cfg, client=client, service=service)
    finally:
        cluster.shutdown()
    print(f"held-out loss {result.val_loss:.4f} nats/token after {cfg.steps} steps "
          f"({result.tokens_per_s:,.0f} tokens/s, {args.workers} worker(s))")
    if cfg.checkpoint:
        print(f"checkpoint: {cfg.checkpoint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import DemoConfig, run

    return run(DemoConfig(train=train_config(args), out_dir=args.out, address=args.address,
                          cluster=args.cluster, shards=args.shards, service=service_options(args)))


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the prompt and its continuation by a trained checkpoint; with `--address`, its rows
    are read from the tables cluster it was trained through."""
    if args.address is None:
        model, indexer, _, corpus = load_checkpoint(args.checkpoint, device=args.device)
        print(generate_text(model, indexer, corpus.tokenizer, args.prompt, args.max_new_tokens,
                            top_k=args.top_k, temperature=args.temperature, seed=args.seed))
        return 0
    from memory_service.cluster import connect
    from trainer.infer import service_tables

    service = saved_model(args.checkpoint).get("service") or {}
    cluster = connect(args.address, name=args.cluster)
    try:
        with cluster.client(security=client_security(args)) as client:
            prefix = args.prefix or service.get("prefix", "engram")
            model, indexer, _, corpus = load_checkpoint(args.checkpoint, service_tables(client, prefix), args.device)
            print(generate_text(model, indexer, corpus.tokenizer, args.prompt, args.max_new_tokens,
                                top_k=args.top_k, temperature=args.temperature, seed=args.seed))
    finally:
        cluster.shutdown()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a tables cluster until SIGINT/SIGTERM, then stop every shard cleanly."""
    from memory_service.cluster import ClusterConfig, connect, start_local

    config = dict(name=args.name, host=args.host, port=args.port,
                  metrics_port=None if args.no_metrics else args.metrics_port,
                  shard_resource=args.resource, security=server_security(args))
    ClusterConfig(num_shards=args.shards, **config)  # check arguments before starting anything
    if args.address:
        cluster = connect(args.address, num_shards=args.shards, **config)
    else:
        cluster = start_local(num_shards=args.shards, **config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's start: its driver installs its own
        signal.signal(sig, lambda *_: stop.set())
    for a in cluster.addresses:
        print(f"shard {a.shard_id}: {a.target}", flush=True)
    for a in cluster.addresses:
        if a.metrics_port:
            print(f"metrics {a.shard_id}: http://{a.host}:{a.metrics_port}/metrics", flush=True)
    print(f"serving {len(cluster.addresses)} shards of cluster {args.name!r}; Ctrl-C to stop", flush=True)
    stop.wait()
    cluster.shutdown()
    print("stopped", flush=True)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the tables cluster's utilization and collision stats (memory_service/ops/stats_view.py)."""
    from memory_service.ops import stats_view
    from memory_service.client import MemoryClient
    from memory_service.cluster import connect

    cluster = None
    if args.targets:
        targets = args.targets.split(",")
    else:
        cluster = connect(args.address, name=args.name)
        targets = cluster.targets
    try:
        with MemoryClient(targets, shared_memory=False, security=client_security(args)) as client:
            stats_view.show(client.report, args.table or None, as_json=args.json, watch=args.watch)
    except KeyboardInterrupt:  # the way out of --watch
        pass
    finally:
        if cluster is not None:
            cluster.shutdown()  # detaches only: the shards keep serving
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Save, restore or inspect a checkpoint of a tables cluster (memory_service/durability/checkpoint.py)."""
    import json

    from memory_service.durability import checkpoint
    from memory_service.errors import MemoryServiceError

    try:
        if args.action == "inspect":
            manifest = checkpoint.inspect_checkpoint(args.path, verify=not args.no_verify)
            checked = "not checked" if args.no_verify else f"{len(manifest.all_files())} files match their sha256"
            if args.json:
                print(json.dumps({**manifest.to_dict(), "verified": not args.no_verify}, indent=1))
            else:
                print(f"{args.path}: {checkpoint.summary(manifest)}\n{checked}")
            return 0
        return _checkpoint_cluster(args, checkpoint)
    except (MemoryServiceError, FileExistsError, ValueError) as err:
        print(f"engram checkpoint {args.action}: {err}", file=sys.stderr)
        return 1


def _checkpoint_cluster(args: argparse.Namespace, checkpoint) -> int:
    """`save` or `restore` against the running tables cluster `args.name`."""
    from memory_service.cluster import connect

    cluster = connect(args.address, name=args.name)
    try:
        with cluster.client(shared_memory=False) as client:
            if args.action == "save":
                manifest = checkpoint.save_checkpoint(args.path, client, args.step, tables=args.table or ())
                print(f"saved {args.path}: {checkpoint.summary(manifest)}")
            else:
                manifest = checkpoint.restore_checkpoint(args.path, client).manifest
                print(f"restored {args.path} onto {len(cluster.addresses)} cold + {len(cluster.hot_addresses)} "
                      f"hot shards of {args.name!r}: {checkpoint.summary(manifest)}")
    finally:
        cluster.shutdown()  # detaches only: the shards keep serving
    return 0


def add_checkpoint_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="save, restore or inspect a checkpoint of a tables cluster")
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (("save", "write the cluster's tables at one step (the shards write their own files)"),
                         ("restore", "load a checkpoint into a cluster without its tables (any shard count)"),
                         ("inspect", "print a checkpoint's step, tables, rows and bytes, and check its files")):
        a = actions.add_parser(action, help=text)
        a.add_argument("path", help="the checkpoint directory (on a filesystem the shards share)")
        if action == "inspect":
            a.add_argument("--json", action="store_true", help="print the manifest as JSON")
            a.add_argument("--no-verify", action="store_true", help="do not read the files to check their sha256")
            continue
        a.add_argument("--address", default="auto", help="Ray cluster the shards run on")
        a.add_argument("--name", default="default", help="tables cluster name (as given to engram serve)")
        if action == "save":
            a.add_argument("--step", type=int, default=None, help="the step every table must be at (default: theirs)")
            a.add_argument("--table", action="append", help="save only this table (repeatable; default: all)")
    p.set_defaults(func=cmd_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram", description="Engram memory: train, generate with and serve hashed N-gram tables")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-local", help="train a model with in-process Engram tables")
    add_train_args(p, steps=200)
    p.set_defaults(func=cmd_train_local)
    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a file written by train-local, train or demo (--checkpoint), or a checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="prompt + new tokens must fit the context")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits before top-k sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device_arg(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster whose table service holds the rows (checkpoints of `engram train`/`demo`)")
    p.add_argument("--name", "--cluster", dest="cluster", default="default",
                   help="tables cluster name (the demo's is 'demo')")
    p.add_argument("--prefix", default=None, help="table prefix (default: the checkpoint's)")
    add_client_security_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="run a tables cluster (Ray shard actors serving gRPC) until interrupted")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--address", default=None, help="Ray cluster to run on (default: an embedded local one)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the shards' gRPC servers")
    p.add_argument("--port", type=int, default=0, help="first shard's port (0: any free port)")
    p.add_argument("--name", default="default", help="cluster name, for drivers that attach by name")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="first shard's Prometheus port (0: any free port); shards sharing a host take the next ones")
    p.add_argument("--no-metrics", action="store_true", help="serve no Prometheus endpoint")
    p.add_argument("--resource", default="engram_shard",
                   help="Ray custom resource each shard takes one unit of (pins shards to the nodes declaring it)")
    p.add_argument("--tls-cert", default=None,
                   help="the shards' certificate chain (PEM; turns TLS on). Tokens: $ENGRAM_READ_TOKENS, "
                        "$ENGRAM_WRITE_TOKENS (comma-separated)")
    p.add_argument("--tls-key", default=None, help="the shards' private key (PEM)")
    p.add_argument("--tls-ca", default=None,
                   help="CA that signed the shards' certificates, for shard-to-shard calls (default: --tls-cert)")
    p.add_argument("--tls-client-ca", default=None,
                   help="require client certificates signed by this CA (mutual TLS)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("train", help="train through a running tables cluster (attach with --address)")
    add_train_args(p, steps=200)
    p.add_argument("--address", required=True, help="Ray cluster address (e.g. 127.0.0.1:6379 or auto)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers (> 1: TorchTrainer)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--worker-resource", default=None,
                   help="custom Ray resource each worker takes one unit of (deploy/: engram_trainer)")
    add_service_args(p, prefix="engram")
    add_client_security_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="the main job: an Engram model trained through the table service vs the baseline")
    add_train_args(p, steps=60, context=128, table_lr_mult=50.0)
    p.add_argument("--address", default=None, help="Ray cluster to attach to (default: start an embedded one)")
    p.add_argument("--shards", type=int, default=2, help="shards of the embedded cluster")
    p.add_argument("--out", default="engram-demo", help="folder for the checkpoint and the loss plot")
    add_service_args(p, prefix="demo")
    p.set_defaults(func=cmd_demo, cluster="demo")
    p = sub.add_parser("stats", help="show shard utilization and hash-collision stats of a tables cluster")
    p.add_argument("--address", default="auto", help="Ray cluster the shards run on (default: RAY_ADDRESS or the local one)")
    p.add_argument("--name", default="default", help="tables cluster name (as given to engram serve)")
    p.add_argument("--targets", default=None, help="comma-separated shard gRPC targets instead of --address")
    p.add_argument("--table", action="append", help="show only this table (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON (one document per line with --watch)")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C")
    add_client_security_args(p)
    p.set_defaults(func=cmd_stats)
    add_checkpoint_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
