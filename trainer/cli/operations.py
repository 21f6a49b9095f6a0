"""An operator's commands on a running tables cluster: `stats` (memory_service/ops/stats_view.py),
`checkpoint save | restore | inspect` (memory_service/durability/checkpoint.py) and `freeze`
(MemoryClient.freeze_table)."""
from __future__ import annotations

import argparse

from trainer.cli.options import (CLIENT_ADDRESS_HELP, add_client_security_args, add_cluster_args, client_security,
                                 client_settings, non_negative_int, positive_float, ray_address)



def cmd_stats(args: argparse.Namespace) -> int:
    """Print the tables cluster's utilization and collision stats, hot and cold shards alike."""
    name, tls_ca = client_settings(args)
    address = None if args.targets else ray_address(args.address)  # a dead address fails before any import
    security = client_security(args, tls_ca)
    from memory_service.client import MemoryClient
    from memory_service.ops import stats_view
    from memory_service.wire.retry import RetryPolicy

    # --timeout bounds each rpc and how long an unreachable shard is retried (the client's 120 s
    # default is for a restarting shard under training, not for an operator waiting at a prompt)
    bounds = dict(timeout=args.timeout, retry=RetryPolicy(deadline_s=args.timeout), shared_memory=False,
                  security=security)
    cluster = None
    if args.targets:
        client = MemoryClient(args.targets.split(","), **bounds)
    else:
        from memory_service.cluster import connect

        cluster = connect(address, name=name, ready_timeout_s=args.timeout)
        client = cluster.client(**bounds)
    try:
        with client:
            stats_view.show(client.report, args.table or None, as_json=args.json, watch=args.watch, by=args.by)
    except KeyboardInterrupt:  # the way out of --watch
        pass
    finally:
        if cluster is not None:
            cluster.shutdown()  # detaches only: the shards keep serving
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Save, restore or inspect a checkpoint of a tables cluster."""
    import json

    from memory_service.durability import checkpoint

    if args.action != "inspect":
        return _checkpoint_cluster(args, checkpoint)
    manifest = checkpoint.inspect_checkpoint(args.path, verify=not args.no_verify)
    checked = "not checked" if args.no_verify else f"{len(manifest.all_files())} files match their sha256"
    if args.json:
        print(json.dumps({**manifest.to_dict(), "verified": not args.no_verify}, indent=1))
    else:
        print(f"{args.path}: {checkpoint.summary(manifest)}\n{checked}")
    return 0


def _checkpoint_cluster(args: argparse.Namespace, checkpoint) -> int:
    """`save` or `restore` against the running tables cluster `--name`."""
    name, tls_ca = client_settings(args)
    security = client_security(args, tls_ca)
    address = ray_address(args.address)
    from memory_service.cluster import connect

    cluster = connect(address, name=name)
    try:
        with cluster.client(shared_memory=False, security=security) as client:
            if args.action == "save":
                manifest = checkpoint.save_checkpoint(args.path, client, args.step, tables=args.table or ())
                print(f"saved {args.path}: {checkpoint.summary(manifest)}")
            else:
                manifest = checkpoint.restore_checkpoint(args.path, client).manifest
                print(f"restored {args.path} onto {len(cluster.addresses)} cold + {len(cluster.hot_addresses)} "
                      f"hot shards of {name!r}: {checkpoint.summary(manifest)}")
    finally:
        cluster.shutdown()  # detaches only: the shards keep serving
    return 0


def label_keys(text: str) -> tuple[str, ...]:
    """--by's value: comma-separated label keys."""
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise argparse.ArgumentTypeError(f"--by {text!r}: name at least one label, e.g. layer,order,head")
    return keys


def cmd_freeze(args: argparse.Namespace) -> int:
    """Freeze a trained table in place on every shard of the cluster `--name`: read-only, no
    optimizer state, rows kept or quantized (--quantization)."""
    name, tls_ca = client_settings(args)
    security = client_security(args, tls_ca)
    address = None if args.targets else ray_address(args.address)
    from memory_service.client import MemoryClient

    cluster = None
    if args.targets:
        client = MemoryClient(args.targets.split(","), shared_memory=False, security=security,
                              hot_targets=args.hot_targets.split(",") if args.hot_targets else ())
    else:
        from memory_service.cluster import connect

        cluster = connect(address, name=name)
        client = cluster.client(shared_memory=False, security=security)
    try:
        with client:
            cfg = client.freeze_table(args.table, args.quantization)
            bf16_bytes = 2 * cfg.width
            print(f"froze {cfg.name!r} ({cfg.quantization}): {cfg.wire_row_bytes} bytes a row on the wire "
                  f"({cfg.wire_row_bytes / bf16_bytes:.2f}x bf16), no optimizer state")
    finally:
        if cluster is not None:
            cluster.shutdown()  # detaches only: the shards keep serving
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("stats", help="show shard utilization and hash-collision stats of a tables cluster")
    add_cluster_args(p, CLIENT_ADDRESS_HELP)
    p.add_argument("--targets", default=None, help="comma-separated shard gRPC targets instead of --address")
    p.add_argument("--table", action="append", help="show only this table (repeatable)")
    p.add_argument("--by", type=label_keys, default=(), metavar="KEYS",
                   help="also sum the tables per group of these comma-separated labels, e.g. layer,order,head "
                        "(the trainer labels each table with its Engram layer, N-gram order and head) or "
                        "namespace: rows read per tier and on hot shards, distinct rows per step, collision share")
    p.add_argument("--json", action="store_true", help="print JSON (one document per line with --watch)")
    p.add_argument("--watch", type=positive_float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--timeout", type=positive_float, default=10.0, metavar="SECONDS",
                   help="give up on a shard that does not answer within SECONDS (default 10)")
    add_client_security_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("checkpoint", help="save, restore or inspect a checkpoint of a tables cluster")
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (("save", "write the cluster's tables at one step (the shards write their own files)"),
                         ("restore", "load a checkpoint into a cluster without its tables (any shard count)"),
                         ("inspect", "print a checkpoint's step, tables, rows and bytes, and check its files")):
        a = actions.add_parser(action, help=text)
        a.add_argument("path", help="the checkpoint directory, inside the cluster's checkpoint root "
                                    "(storage.checkpoint_root; on a filesystem the shards share)")
        if action == "inspect":
            a.add_argument("--json", action="store_true", help="print the manifest as JSON")
            a.add_argument("--no-verify", action="store_true", help="do not read the files to check their sha256")
            continue
        add_cluster_args(a, CLIENT_ADDRESS_HELP)
        add_client_security_args(a)
        if action == "save":
            a.add_argument("--step", type=non_negative_int, default=None,
                           help="the step every table must be at (default: theirs)")
            a.add_argument("--table", action="append", help="save only this table (repeatable; default: all)")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("freeze", help="make a trained table read-only in place: no optimizer state, rows "
                                      "kept bit for bit or quantized to fp8/int8 (idempotent)")
    add_cluster_args(p, CLIENT_ADDRESS_HELP)
    p.add_argument("--targets", default=None, help="comma-separated cold shard gRPC targets instead of --address")
    p.add_argument("--hot-targets", default=None, help="with --targets: the hot shards' (every shard must be named)")
    p.add_argument("--table", required=True, help="the table to freeze")
    p.add_argument("--quantization", choices=("none", "fp8_e4m3", "int8"), default="none",
                   help="store and send its rows as fp8 e4m3 or int8 codes with a float32 scale per row "
                        "(4 + width bytes a row; error bounds in memory_service/quantization.py); default: "
                        "keep them as they are")
    add_client_security_args(p)
    p.set_defaults(func=cmd_freeze)
