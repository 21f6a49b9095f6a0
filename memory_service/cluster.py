"""Tables clusters on Ray: launch, find (through a named registry actor) and stop the shard actors.

`start_local()` starts an embedded local Ray cluster on demand (the default: demo, tests);
`connect(address)` attaches to a running Ray cluster (`ray start --head`, KubeRay). Either way the
shard actors are real Ray actors placed with a custom resource (`engram_shard` by default,
`ClusterConfig.shard_resource`), so a deployment pins shards to nodes by declaring that resource
only where shards should run (deploy/: one unit per shard pod). The actor itself, a shard serving
gRPC, is memory_service/server/shard_actor.py; this module starts, finds and stops them.

Crashes. A cold shard with a disk directory (`storage.path`) is restarted by Ray after a crash
(`ClusterConfig.max_restarts`): the new process recovers every acknowledged change from its LMDB
files and write-ahead log, binds the port its predecessor had (read from the registry, which
outlives it) and re-registers; clients' channels reconnect by themselves and re-send what failed.
On SIGTERM (Kubernetes stopping a pod) a shard stops serving, flushes and exits. All-DRAM and hot
shards are not restarted: their rows die with their process (a restart would serve empty tables).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import ray

from memory_service.config import StorageConfig
from memory_service.placement import DEFAULT_POLICY
from memory_service.wire.security import SecurityConfig, is_loopback, warn_if_exposed
from memory_service.server.shard_actor import NAMESPACE, ShardActor
from memory_service.server.shard_address import ShardAddress
# shard_env is re-exported: a cold shard's malloc settings, which tests apply to a plain process
from memory_service.server.shard_process import LOCAL_NICENESS, SHARD_ENV, shard_env  # noqa: F401

log = logging.getLogger(__name__)
SHARD_RESOURCE = "engram_shard"


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how shards run. `port` 0 lets each shard pick a free port; a fixed port P makes
    each shard bind the first free port from P upward (at most num_shards tries): on Kubernetes
    every shard has a pod, and so a network namespace, of its own and all listen on P, the port the
    manifests declare; shards sharing a host take P, P + 1, ... `metrics_port` likewise places each
    shard's Prometheus endpoint (at its gRPC port's offset from P), None disables it. `host` is the
    bind address (loopback by default; binding elsewhere without TLS warns). `security`: the shards'
    TLS and tokens (memory_service.wire.security; None: open), with `security.peer` the credentials a
    hot shard's migration uses on the cold shards.
    `shard_resource` is the Ray custom resource each shard takes one unit of. `storage` is where
    shards keep rows: all in DRAM by default; with `storage.path`, each shard is a cold shard with
    its LMDB files in its own subdirectory `shard-NNNN` of that path (StorageConfig.for_shard).
    Such a shard is restarted by Ray up to `max_restarts` times (-1: always) after a crash, and
    recovers from its files; all-DRAM shards and hot shards are never restarted.
    `niceness` is the shards' CPU priority (0 normal, 19 lowest): shards sharing a host's cores with
    a trainer (the embedded cluster) should yield to it, or each of their bursts stalls the
    trainer's whole intra-op parallel region; shards on hosts of their own keep 0."""

    num_shards: int = 2
    name: str = "default"  # several tables clusters can share one Ray cluster under different names
    host: str = "127.0.0.1"
    port: int = 0
    num_cpus_per_shard: float = 0.0  # shards mostly wait on IO; 0 keeps small machines schedulable
    metrics_port: int | None = 0
    shard_resource: str = SHARD_RESOURCE
    num_hot: int = 0  # hot shards (one per GPU where there are GPUs; DRAM otherwise)
    hot_rows: int = 65536  # rows per table each hot shard keeps
    placement: str = DEFAULT_POLICY  # memory_service.placement.make_policy name
    migrate_interval_s: float = 0.05
    migrate_max_duty: float = 0.05  # wall-clock share of a hot shard's migrator (Migrator: ~50 ms of CPU a 1 s step)
    storage: StorageConfig = StorageConfig()  # the cold shards' DRAM budget over LMDB (path None: DRAM only)
    max_restarts: int = 3
    niceness: int = 0
    security: SecurityConfig | None = None  # TLS and tokens of every shard (None: open)

    def __post_init__(self) -> None:
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts {self.max_restarts} must be >= -1 (-1: no limit)")
        if not 0 <= self.num_hot <= 64 or self.hot_rows < 0:
            raise ValueError(f"num_hot {self.num_hot} must be in [0, 64] and hot_rows {self.hot_rows} >= 0")
        if not 1 <= self.num_shards <= 4096:
            raise ValueError(f"num_shards {self.num_shards} must be in [1, 4096]")
        if not 0 <= self.port <= 65535 or (self.port and self.port + self.num_shards - 1 > 65535):
            raise ValueError(f"port {self.port} with {self.num_shards} shards exceeds 65535")
        if not self.name:
            raise ValueError("cluster name must not be empty")
        if self.metrics_port is not None and not (
                0 <= self.metrics_port and self.metrics_port + self.num_shards - 1 <= 65535):
            raise ValueError(f"metrics_port {self.metrics_port} with {self.num_shards} shards must "
                             f"be in [0, 65535]")
        if not 0 <= self.niceness <= 19:
            raise ValueError(f"niceness {self.niceness} must be in [0, 19]")
        if not 0 < self.migrate_max_duty <= 1:
            raise ValueError(f"migrate_max_duty {self.migrate_max_duty} must be in (0, 1]")
        if not self.shard_resource:
            raise ValueError("shard_resource must not be empty")
        if self.security is not None and self.security.has_tokens and not self.security.is_tls \
                and not is_loopback(self.host):
            raise ValueError(f"tokens without TLS on host {self.host}: clients send tokens only over TLS or "
                             f"to loopback (shards advertise this node's address): set security.cert/key")
        if self.security is not None and not self.security.is_open and self.num_hot and self.security.peer is None:
            raise ValueError("a secured cluster with hot shards needs security.peer: the credentials "
                             "(TLS root, write token) its migration uses on the cold shards")


@ray.remote(num_cpus=0)
class Registry:
    """(shard id -> address) of one tables cluster; a named actor so any driver finds it."""

    def __init__(self, num_shards: int, num_hot: int = 0):
        self.num_shards, self.num_hot = num_shards, num_hot
        self.addresses: dict[tuple[str, int], ShardAddress] = {}

    def register(self, address: ShardAddress) -> None:
        self.addresses[(address.role, address.shard_id)] = address

    def address(self, role: str, shard_id: int) -> ShardAddress | None:
        """Where shard (role, shard_id) served, if it registered (a restarted shard binds it again)."""
        return self.addresses.get((role, shard_id))

    def shards(self, role: str = "cold") -> list[ShardAddress]:
        return [a for (r, _), a in sorted(self.addresses.items()) if r == role]

    def get_num_shards(self) -> int:
        return self.num_shards

    def get_num_hot(self) -> int:
        return self.num_hot


class TableCluster:
    """Handles to the shard actors of one tables cluster and their gRPC addresses."""

    def __init__(self, config: ClusterConfig, actors: list, registry, owns_ray: bool, owns_actors: bool = True,
                 hot_actors: list = ()):
        self.config = config
        self.actors = actors  # the cold shards, in shard order
        self.hot_actors = list(hot_actors)
        self.registry = registry
        self.owns_ray = owns_ray
        self.owns_actors = owns_actors  # False when attached to shards another driver started
        self.addresses: list[ShardAddress] = ray.get(registry.shards.remote())
        self.hot_addresses: list[ShardAddress] = ray.get(registry.shards.remote("hot"))

    @property
    def targets(self) -> list[str]:
        return [a.target for a in self.addresses]

    @property
    def hot_targets(self) -> list[str]:
        return [a.target for a in self.hot_addresses]

    def client(self, **kwargs):
        from memory_service.client import MemoryClient

        return MemoryClient(self.targets, hot_targets=self.hot_targets, **kwargs)

    def shutdown(self) -> None:
        """Stop the gRPC servers and kill the actors if this object started them; stop Ray if it
        started Ray."""
        if self.owns_actors:
            ray.get([a.stop.remote() for a in self.hot_actors])  # migration stops first
            ray.get([a.stop.remote() for a in self.actors])
            for actor in [*self.hot_actors, *self.actors, self.registry]:
                ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()


def registry_name(name: str) -> str:
    return f"engram_registry:{name}"


def init_local_ray(num_cpus: int | None = None) -> bool:
    """Start the embedded single-machine Ray cluster if none is running in this process.

    Loopback only and token auth off: this cluster never leaves the machine. Returns True if it
    started Ray (and so should stop it)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs workers at nice 15; a shard answers latency-bound requests while the trainer computes
    # beside it on the same cores, and at nice 15 a 16k-row fetch took 2x as long (measured here).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(namespace=NAMESPACE, num_cpus=num_cpus, resources={SHARD_RESOURCE: 4096},
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def launch(config: ClusterConfig, owns_ray: bool = False) -> TableCluster:
    """Start `config.num_shards` shard actors and wait until every one serves gRPC."""
    warn_if_exposed(config.host, config.security)  # here too: an actor's warning stays in its log
    name = registry_name(config.name)
    registry = Registry.options(name=name, namespace=NAMESPACE).remote(config.num_shards, config.num_hot)
    shards = config.num_shards + config.num_hot
    if config.storage.path is None:
        log.warning("cluster %r: shards without storage.path keep their rows only in DRAM: a crashed "
                    "shard loses them and is not restarted", config.name)
    # a restarted shard recovers from its files; actor calls a crash interrupted are re-run (all are safe to)
    restarts = {} if config.storage.path is None else dict(
        max_restarts=config.max_restarts, max_task_retries=config.max_restarts)
    actors = [
        ShardActor.options(num_cpus=config.num_cpus_per_shard, resources={config.shard_resource: 1},
                           name=f"engram_shard:{config.name}:{i}", namespace=NAMESPACE,
                           runtime_env={"env_vars": shard_env(config.storage)}, **restarts)
        .remote(i, config.num_shards, config.host, config.port, name, config.metrics_port,
                config.name, shards, track_accesses=config.num_hot > 0, storage=config.storage.for_shard(i),
                security=config.security, niceness=config.niceness)
        for i in range(config.num_shards)
    ]
    cold = ray.get([a.get_address.remote() for a in actors])  # raises here if a shard failed to start
    gpus = ray.cluster_resources().get("GPU", 0) >= config.num_hot > 0
    migration = dict(cold_targets=[a.target for a in cold], capacity=config.hot_rows,
                     policy=config.placement, interval_s=config.migrate_interval_s,
                     max_duty=config.migrate_max_duty,
                     security=config.security.peer if config.security is not None else None)
    hot_actors = [
        ShardActor.options(num_cpus=config.num_cpus_per_shard, num_gpus=1 if gpus else 0,
                           resources={config.shard_resource: 1}, name=f"engram_hot:{config.name}:{i}",
                           namespace=NAMESPACE, runtime_env={"env_vars": SHARD_ENV})
        .remote(i, config.num_hot, config.host, config.port, name, config.metrics_port, config.name, shards,
                role="hot", track_accesses=True, migration=migration, security=config.security,
                niceness=config.niceness, device="cuda" if gpus else None)  # rows in its GPU's memory
        for i in range(config.num_hot)
    ]
    ray.get([a.get_address.remote() for a in hot_actors])
    return TableCluster(config, actors, registry, owns_ray, hot_actors=hot_actors)


def start_local(num_shards: int = 2, num_hot: int = 1, niceness: int = LOCAL_NICENESS, **kwargs) -> TableCluster:
    """Embedded default: a local Ray cluster started on demand, with `num_shards` cold shards and
    `num_hot` hot shards, at `niceness` (they share this host's cores with the trainer)."""
    owns_ray = init_local_ray()
    return launch(ClusterConfig(num_shards=num_shards, num_hot=num_hot, niceness=niceness, **kwargs),
                  owns_ray=owns_ray)


def connect(address: str, num_shards: int | None = None, **kwargs) -> TableCluster:
    """Attach to a running Ray cluster at `address`. With `num_shards`, start that many shards
    there; without, find the shards another driver started under the cluster name."""
    owns_ray = False
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        owns_ray = True
    if num_shards is not None:
        return launch(ClusterConfig(num_shards=num_shards, **kwargs), owns_ray=owns_ray)
    config = ClusterConfig(**kwargs)
    registry = ray.get_actor(registry_name(config.name), namespace=NAMESPACE)
    expected = ray.get(registry.get_num_shards.remote())
    deadline = time.monotonic() + 60
    while len(ray.get(registry.shards.remote())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only some of {expected} shards of cluster {config.name!r} registered in 60 s")
        time.sleep(0.2)
    actors = [ray.get_actor(f"engram_shard:{config.name}:{i}", namespace=NAMESPACE) for i in range(expected)]
    num_hot = ray.get(registry.get_num_hot.remote())
    while len(ray.get(registry.shards.remote("hot"))) < num_hot:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only some of {num_hot} hot shards of cluster {config.name!r} registered in 60 s")
        time.sleep(0.2)
    hot = [ray.get_actor(f"engram_hot:{config.name}:{i}", namespace=NAMESPACE) for i in range(num_hot)]
    return TableCluster(replace(config, num_shards=expected, num_hot=num_hot), actors, registry, owns_ray,
                        owns_actors=False, hot_actors=hot)
