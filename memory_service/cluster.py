"""Shards as Ray actors, each serving gRPC, found through a named registry actor.

`start_local()` starts an embedded local Ray cluster on demand (the default: demo, tests);
`connect(address)` attaches to a running Ray cluster (`ray start --head`, KubeRay). Either way the
shard actors are real Ray actors placed with a custom resource (`engram_shard` by default,
`ClusterConfig.shard_resource`), so a deployment pins shards to nodes by declaring that resource
only where shards should run (deploy/: one unit per shard pod).

Crashes. A cold shard with a disk directory (`storage.path`) is restarted by Ray after a crash
(`ClusterConfig.max_restarts`): the new process recovers every acknowledged change from its LMDB
files and write-ahead log, binds the port its predecessor had (read from the registry, which
outlives it) and re-registers; clients' channels reconnect by themselves and re-send what failed.
On SIGTERM (Kubernetes stopping a pod) a shard stops serving, flushes and exits. All-DRAM and hot
shards are not restarted: their rows die with their process (a restart would serve empty tables).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace

import ray

from memory_service.config import StorageConfig
from memory_service.wire.security import SecurityConfig, is_loopback, warn_if_exposed
from memory_service.shard.shard import Shard
from memory_service.server.shard_process import LOCAL_NICENESS, SHARD_ENV, shard_env, set_priority

log = logging.getLogger(__name__)
NAMESPACE = "engram_memory"  # named actors are per namespace: every driver must use this one
SHARD_RESOURCE = "engram_shard"
SIGTERM_GRACE_S = 5.0  # rpcs in flight may finish this long after SIGTERM (Kubernetes waits 30 s by default)


@dataclass(frozen=True)
class ShardAddress:
    shard_id: int
    host: str
    port: int
    metrics_port: int = 0  # the shard's Prometheus endpoint, http://host:metrics_port/metrics; 0: none
    role: str = "cold"  # "cold": home of rows id % num_shards; "hot": of the hot rows id % num_hot

    @property
    def target(self) -> str:
        """gRPC target, "host:port"."""
        return f"{self.host}:{self.port}"


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
    placement: str = "engram"  # memory_service.placement.policy.make_policy name
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


@ray.remote(max_concurrency=4)
class ShardActor:
    """One shard: the plain `Shard` behind a gRPC server started inside the actor's process."""

    def __init__(self, shard_id: int, num_shards: int, host: str, port: int, registry_name: str,
                 metrics_port: int | None = None, cluster: str = "default", port_tries: int = 1,
                 role: str = "cold", track_accesses: bool = False, migration: dict | None = None,
                 storage: StorageConfig | None = None, security: SecurityConfig | None = None,
                 niceness: int = 0, device: str | None = None):
        set_priority(niceness)  # before serve(): the gRPC threads inherit this thread's priority
        registry = ray.get_actor(registry_name, namespace=NAMESPACE)
        previous = ray.get(registry.address.remote(role, shard_id))  # set: this is a restart
        self.shard = Shard(shard_id, num_shards, role=role, track_accesses=track_accesses, storage=storage,
                           device=device)
        if previous is None:
            self.server = _serve_first_free(self.shard, host, port, metrics_port, cluster, port_tries, security)
        else:  # clients know this address: take it again
            self.server = _serve_again(self.shard, host, previous, metrics_port is not None, cluster, security)
            log.warning("shard %s %d restarted (pid %d) on port %d: %d write-ahead log records replayed",
                        role, shard_id, os.getpid(), self.server.port, self.shard.journal.replayed)
        advertised = node_ip() if host in ("0.0.0.0", "::") else host
        metrics = self.server.metrics.port if self.server.metrics is not None else 0
        self.address = ShardAddress(shard_id, advertised, self.server.port, metrics, role)
        self.migrator = None
        if migration is not None:  # a hot shard places rows between the cold shards and itself
            from memory_service.server.migration import Migrator

            self.migrator = Migrator(self.shard, **migration).start()
        ray.get(registry.register.remote(self.address))
        self._stopped = False
        self._stop_lock = threading.Lock()  # stop() from an actor call and from SIGTERM: once
        self._on_signal = None
        if threading.current_thread() is threading.main_thread():  # Ray runs __init__ there
            self._on_signal = signal.getsignal(signal.SIGTERM)  # Ray's: exits the worker
            signal.signal(signal.SIGTERM, self._sigterm)

    def _sigterm(self, signum, frame) -> None:
        """SIGTERM (Kubernetes stopping the pod, `ray stop`): stop serving, finish the rpcs in
        flight, flush every dirty row and close the files, then exit as Ray does on SIGTERM (Ray
        restarts the actor where it can). A restart then replays nothing."""
        log.warning("shard %s %d: SIGTERM: flushing and exiting", self.address.role, self.address.shard_id)
        try:
            self.stop(SIGTERM_GRACE_S)
        finally:
            if callable(self._on_signal):
                self._on_signal(signum, frame)
            raise SystemExit(1)

    def pid(self) -> int:
        """The actor's process id (it changes when Ray restarts the actor)."""
        return os.getpid()

    def recovery(self) -> dict[str, int]:
        """What this process's shard recovered at start: write-ahead log records replayed, and
        checkpoints (flushes) taken since."""
        return {"wal_replayed": self.shard.journal.replayed, "checkpoints": self.shard.journal.checkpoints}

    def table_state(self, name: str) -> dict:
        """This shard's written rows of `name` with their optimizer state (Shard.table_state)."""
        return self.shard.table_state(name)

    def stop_migration(self) -> None:
        """Ends this hot shard's migration (after the move in progress): rows stay where they are."""
        if self.migrator is not None:
            self.migrator.stop()

    def migration_counters(self) -> dict[str, int]:
        """Rounds, rows promoted and demoted by this hot shard's migrator (and its last error)."""
        if self.migrator is None:
            return {}
        out = dataclasses.asdict(self.migrator.counters)
        out["error"] = repr(self.migrator.error) if self.migrator.error else ""
        return out

    def get_address(self) -> ShardAddress:
        return self.address

    def counters(self) -> dict[str, int]:
        return dataclasses.asdict(self.shard.counters)

    def digest(self) -> str:
        """Digest of every table's rows and optimizer state: proves a rejected request changed nothing."""
        return self.shard.digest()

    def rss_bytes(self) -> int:
        """Anonymous resident memory of this actor's process (Linux), for memory budgets."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, grace: float = 1.0) -> None:
        """Stops migrating and serving, then closes the shard (a cold shard writes its dirty rows
        back and empties its write-ahead log). Once; later calls do nothing."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if self.migrator is not None:
                self.migrator.stop()
            self.server.stop(grace)  # waits for in-flight rpcs (up to `grace`)
            self.shard.close()


def _serve_first_free(shard: Shard, host: str, port: int, metrics_port: int | None, cluster: str,
                      tries: int, security: SecurityConfig | None = None):
    """serve() on the first of ports port, port + 1, ... (`tries` of them; one try for port 0)
    whose gRPC and metrics ports are both free."""
    from memory_service.server.servicer import serve  # import in the actor process only

    error: Exception | None = None
    for offset in range(tries if port else 1):
        try:
            return serve(shard, host=host, port=port + offset if port else 0, cluster=cluster,
                         metrics_port=metrics_port + offset if metrics_port else metrics_port,
                         security=security)
        except (RuntimeError, OSError) as err:  # gRPC's and http.server's "address in use"
            error = err
    raise RuntimeError(f"shard {shard.shard_id}: no free port in [{port}, {port + tries}) "
                       f"(metrics from {metrics_port}) on {host}") from error


def _serve_again(shard: Shard, host: str, previous: ShardAddress, metrics: bool, cluster: str,
                 security: SecurityConfig | None = None, timeout: float = 30.0):
    """serve() on the ports a crashed predecessor had, retried while they are still taken (the
    kernel frees them as the dead process is reaped)."""
    from memory_service.server.servicer import serve

    deadline = time.monotonic() + timeout
    while True:
        try:
            return serve(shard, host=host, port=previous.port, cluster=cluster,
                         metrics_port=previous.metrics_port if metrics else None, security=security)
        except (RuntimeError, OSError) as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"shard {shard.shard_id}: port {previous.port} (metrics "
                                   f"{previous.metrics_port}) still taken after {timeout:.0f} s") from err
            time.sleep(0.2)


def node_ip() -> str:
    return ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostbyname(socket.gethostname())


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
