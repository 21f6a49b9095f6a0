"""`engram serve` (a tables cluster from a config file and flags) and `engram stop` (removes a
detached one). The flags are ClusterConfig's fields under command-line names; a flag given
overrides the file (memory_service/config_file.py), a flag left out leaves the file's value."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from trainer.cli.options import (CLIENT_ADDRESS_HELP, add_cluster_args, non_negative_float, non_negative_int,
                                 positive_float, positive_int, ray_address, size)

# flag dest -> ClusterConfig field ("storage." for StorageConfig's, "security." for the TLS files)
SERVE_FIELDS = {
    "shards": "num_shards", "hot_shards": "num_hot", "hot_rows": "hot_rows", "hot_resource": "hot_resource",
    "hot_device": "hot_device", "host": "host", "port": "port", "metrics_port": "metrics_port",
    "resource": "shard_resource", "max_restarts": "max_restarts", "placement": "placement",
    "migrate_max_duty": "migrate_max_duty", "ready_timeout": "ready_timeout_s",
    "join_timeout": "join_timeout_s", "name": "name",
    "storage_path": "storage.path", "dram_budget": "storage.dram_budget_bytes",
    "checkpoint_root": "storage.checkpoint_root",
    "tls_cert": "security.tls_cert", "tls_key": "security.tls_key", "tls_ca": "security.tls_ca",
    "tls_client_ca": "security.tls_client_ca",
}


def serve_overrides(args: argparse.Namespace) -> dict:
    """The flags given, as config_file overrides (nested for storage and security)."""
    overrides: dict = {}
    for dest, field in SERVE_FIELDS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        section, _, key = field.rpartition(".")
        (overrides.setdefault(section, {}) if section else overrides)[key] = value
    for namespace, rows in args.quota_rows or ():
        overrides.setdefault("quotas", {}).setdefault(namespace, {})["max_rows"] = rows
    for namespace, nbytes in args.quota_bytes or ():
        overrides.setdefault("quotas", {}).setdefault(namespace, {})["max_bytes"] = nbytes
    for namespace, (scope, digest) in args.namespace_token or ():
        scoped = overrides.setdefault("security", {}).setdefault("namespace_tokens", {})
        scoped.setdefault(namespace, {}).setdefault(scope, []).append(digest)
    if args.no_metrics:
        overrides["metrics_port"] = None
    if args.detach:
        overrides["detached"] = True
    return overrides


def _namespaced(value_type):
    """An argparse type 'NAMESPACE=VALUE' -> (namespace, value_type(VALUE))."""
    def parse(text: str):
        namespace, sep, value = text.partition("=")
        if not sep or "/" in namespace:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAMESPACE=VALUE (a namespace has no '/'; "
                                             f"'=VALUE' alone is the default namespace)")
        return namespace, value_type(value)
    return parse


def _scoped_digest(text: str) -> tuple[str, str]:
    """'read:DIGEST' or 'write:DIGEST' -> (scope, digest)."""
    scope, _, digest = text.partition(":")
    if scope not in ("read", "write") or len(digest) != 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected read:DIGEST or write:DIGEST, the digest being the "
                                         f"token's sha256 hex (printf %s TOKEN | sha256sum)")
    return scope, digest


def cmd_serve(args: argparse.Namespace) -> int:
    """Start a tables cluster and serve until SIGINT/SIGTERM, or until a shard dies for good (Ray
    gave up restarting it, or it is one that is never restarted): that is logged, the other shards
    stop (cold ones flush) and serve exits with 1; a shard Ray restarted is logged, and serving
    goes on (memory_service/cluster_watch.py). Its shards are owned by this process
    (stopped cleanly on the signal) unless detached (`detached: true` or `--detach`): then the
    signal only detaches, the shards keep serving until `engram stop`, and starting `engram
    serve` again with the same config attaches to them (a restarted Kubernetes sidecar). With
    `--detach` it returns as soon as every shard serves."""
    from memory_service.config_file import ConfigError, load_cluster_config
    from memory_service.errors import ClusterError

    config = load_cluster_config(args.config, serve_overrides(args))  # checked before anything starts
    address = ray_address(args.address, default=None)  # None: the embedded one
    if config.detached and address is None:
        raise ConfigError("detached shards need a Ray cluster that outlives this process (--address or "
                          "$RAY_ADDRESS): the embedded one stops when engram serve exits")
    from memory_service import cluster as clusters

    owns_ray = clusters.attach_ray(address, log_to_driver=True)  # shards' warnings reach this log
    cluster = clusters.launch(config, owns_ray=owns_ray)
    if cluster.already_running:
        _follow_other_jobs_logs()
    _print_shards(cluster)
    shards = f"{len(cluster.addresses)} shards" + (f" and {len(cluster.hot_addresses)} hot shards"
                                                   if cluster.hot_addresses else "")
    already = " (already running: attached)" if cluster.already_running else ""
    if args.detach:
        cluster.shutdown()  # detaches only
        print(f"serving {shards} of cluster {config.name!r}{already}, detached; `engram stop --name "
              f"{config.name}` stops them", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's start: its driver installs its own
        signal.signal(sig, lambda *_: stop.set())
    ending = (f"a signal detaches; `engram stop --name {config.name}` stops them" if config.detached
              else "Ctrl-C to stop")
    watch = cluster.watch()
    print(f"serving {shards} of cluster {config.name!r}{already}; {ending}", flush=True)
    dead = watch.run(stop)  # restarts are logged; a shard that died for good ends serving
    if not dead:
        cluster.shutdown()  # stops the shards, or detaches from detached ones
        print(f"detached: cluster {config.name!r} keeps serving" if config.detached else "stopped", flush=True)
        return 0
    for event in dead:
        print(f"error: {event}: cluster {config.name!r} cannot serve its rows", file=sys.stderr, flush=True)
    try:
        cluster.shutdown()  # the others stop cleanly (cold ones flush), or stay when detached
    except ClusterError as err:  # names the dead ones again
        print(f"error: {err}", file=sys.stderr, flush=True)
    print(f"detached: the other shards of {config.name!r} keep serving until `engram stop --name {config.name}`"
          if config.detached else "stopped the other shards", flush=True)
    return 1


def _follow_other_jobs_logs() -> None:
    """Attached to detached shards an earlier `engram serve` (another Ray job) started: Ray's
    driver shows only its own job's worker logs, and the shards' warnings would stop reaching
    this log (`kubectl logs`) after a sidecar restart. Ray Serve's controller sets the same flag."""
    import ray._private.worker as ray_worker

    if hasattr(ray_worker.global_worker, "_filter_logs_by_job"):
        ray_worker.global_worker._filter_logs_by_job = False


def _print_shards(cluster) -> None:
    for a in cluster.addresses:
        print(f"shard {a.shard_id}: {a.target}", flush=True)
    for a in cluster.hot_addresses:
        print(f"hot shard {a.shard_id}: {a.target}", flush=True)
    for a in [*cluster.addresses, *cluster.hot_addresses]:
        if a.metrics_port:
            print(f"metrics {a.role} {a.shard_id}: http://{a.host}:{a.metrics_port}/metrics", flush=True)


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop every shard of a (detached) tables cluster cleanly and remove its actors and registry."""
    from trainer.cli.options import client_settings, ray_address

    name, _ = client_settings(args)
    address = ray_address(args.address)
    from memory_service import cluster as clusters

    stopped = clusters.stop_cluster(name, address=address, timeout_s=args.timeout)
    print(f"stopped {stopped} shards of tables cluster {name!r}", flush=True)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run a tables cluster (Ray shard actors serving gRPC)",
                       description="Flags override the --config file; what neither gives keeps ClusterConfig's "
                                   "default. Tokens: $ENGRAM_READ_TOKENS, $ENGRAM_WRITE_TOKENS (comma-separated); "
                                   "tokens scoped to namespaces: --namespace-token (digests).")
    add_cluster_args(p, "Ray cluster to run on (default: $RAY_ADDRESS, else an embedded local one)")
    p.add_argument("--shards", type=positive_int, default=None, help="cold shards (default 2)")
    p.add_argument("--hot-shards", type=non_negative_int, default=None, help="hot shards (default 0)")
    p.add_argument("--hot-rows", type=non_negative_int, default=None, help="rows per table a hot shard keeps")
    p.add_argument("--hot-resource", default=None,
                   help="Ray resource a hot shard takes one unit of (default: --resource's)")
    p.add_argument("--hot-device", default=None, choices=("auto", "cuda", "cpu"),
                   help="where hot rows live (auto: cuda where the node has a GPU)")
    p.add_argument("--storage-path", default=None,
                   help="directory of the shards' LMDB files and write-ahead logs (shard-NNNN and hot-NNNN "
                        "inside; default: DRAM only, and no restarts)")
    p.add_argument("--checkpoint-root", default=None, metavar="DIR",
                   help="the only directory the shards save checkpoints in and restore them from "
                        "(default: checkpoints/ under --storage-path; none without it: checkpoints refused)")
    p.add_argument("--dram-budget", type=size, default=None, metavar="BYTES",
                   help="a shard's DRAM over its LMDB files, e.g. 4GiB")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="restarts of a crashed shard with --storage-path (-1: always; default 3)")
    p.add_argument("--placement", default=None, help="hot shards' placement policy (default engram)")
    p.add_argument("--migrate-max-duty", type=positive_float, default=None,
                   help="wall-clock share a hot shard's migration may take")
    p.add_argument("--detach", action="store_true",
                   help="detached shards (they outlive this process until `engram stop`), and return once "
                        "they serve")
    p.add_argument("--join-timeout", type=non_negative_float, default=None, metavar="SECONDS",
                   help="wait this long for Ray nodes offering the shard resources to join (default 0: fail at once)")
    p.add_argument("--ready-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="deadline of every wait for shards to start")
    p.add_argument("--host", default=None, help="bind address of the shards' gRPC servers (default 127.0.0.1)")
    p.add_argument("--port", type=non_negative_int, default=None, help="first shard's port (0: any free port)")
    p.add_argument("--metrics-port", type=non_negative_int, default=None,
                   help="first shard's Prometheus port (0: any free port); shards sharing a host take the next ones")
    p.add_argument("--no-metrics", action="store_true", help="serve no Prometheus endpoint")
    p.add_argument("--resource", default=None,
                   help="Ray custom resource each shard takes one unit of (default engram_shard; pins shards "
                        "to the nodes declaring it)")
    p.add_argument("--tls-cert", default=None, help="the shards' certificate chain (PEM; turns TLS on)")
    p.add_argument("--tls-key", default=None, help="the shards' private key (PEM)")
    p.add_argument("--tls-ca", default=None,
                   help="CA that signed the shards' certificates, for shard-to-shard calls (default: --tls-cert)")
    p.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--namespace-token", type=_namespaced(_scoped_digest), action="append", default=None,
                   metavar="NS=SCOPE:DIGEST",
                   help="a token scoped to namespace NS (a table name's part before its first '/'): SCOPE read "
                        "or write, DIGEST its sha256 hex (printf %%s TOKEN | sha256sum); repeatable; replaces "
                        "the file's security.namespace_tokens")
    p.add_argument("--quota-rows", type=_namespaced(non_negative_int), action="append", default=None,
                   metavar="NS=ROWS", help="the most rows namespace NS's tables may store in the cluster "
                                           "(each cold shard enforces its share); repeatable")
    p.add_argument("--quota-bytes", type=_namespaced(size), action="append", default=None, metavar="NS=BYTES",
                   help="the most bytes (4 x (width + optimizer state) per stored row) namespace NS's tables "
                        "may store, e.g. a=8GiB; repeatable")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop a detached tables cluster: flush every shard, remove its actors")
    add_cluster_args(p, CLIENT_ADDRESS_HELP)
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="deadline for the shards to flush and stop")
    p.set_defaults(func=cmd_stop)
