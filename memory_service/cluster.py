"""Tables clusters on Ray: launch, find (through a named registry actor) and stop the shard actors.

`start_local()` starts an embedded local Ray cluster on demand (the default: demo, tests);
`connect(address)` attaches to a running Ray cluster (`ray start --head`, KubeRay). Either way the
shard actors are real Ray actors placed with a custom resource (`engram_shard` by default,
`ClusterConfig.shard_resource`), so a deployment pins shards to nodes by declaring that resource
only where shards should run (deploy/: one unit per shard pod). The actor itself, a shard serving
gRPC, is memory_service/server/shard_actor.py; this module starts, finds and stops them.
`attach_ray(address)` joins Ray as Ray does: `address`, else $RAY_ADDRESS (set inside a KubeRay pod
or a Ray job), else the embedded cluster. `launch()` first checks that the Ray cluster's nodes offer
the shards' resources (a shard waiting for a resource no node offers would wait forever), and every
wait has a deadline (`ready_timeout_s`).

Lifetime. Shards belong to the driver that launched them and die with it, unless
`ClusterConfig.detached`: then shards and registry are detached Ray actors that keep serving after
the launcher exits (`engram serve --detach`), and `stop_cluster(name)` (`engram stop`) ends them.

Crashes. A cold shard with a disk directory (`storage.path`) is restarted by Ray after a crash
(`ClusterConfig.max_restarts`): the new process recovers every acknowledged change from its LMDB
files and write-ahead log, binds the port its predecessor had (read from the registry, which
outlives it) and re-registers; clients' channels reconnect by themselves and re-send what failed.
On SIGTERM (Kubernetes stopping a pod) a shard stops serving, flushes and exits. All-DRAM and hot
shards are not restarted: their rows die with their process (a restart would serve empty tables).
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import ray

from memory_service.config import StorageConfig
from memory_service.placement import DEFAULT_POLICY
from memory_service.wire.security import SecurityConfig, is_loopback, warn_if_exposed
from memory_service.errors import ClusterError, ClusterNotFound
from memory_service.server.registry import NAMESPACE, Registry, registry_name, shard_name
from memory_service.server.shard_actor import ShardActor
from memory_service.server.shard_address import ShardAddress
# shard_env is re-exported: a cold shard's malloc settings, which tests apply to a plain process
from memory_service.server.shard_process import LOCAL_NICENESS, SHARD_ENV, shard_env  # noqa: F401

log = logging.getLogger(__name__)
SHARD_RESOURCE = "engram_shard"
HOT_DEVICES = ("auto", "cuda", "cpu")
RESOURCE_WAIT_S = 2.0  # how long launch() waits for resource units in use to be freed
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a new local Ray's node address is 127.0.0.1
HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head node has one unit (Ray Train pins its state actor so)


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
    trainer's whole intra-op parallel region; shards on hosts of their own keep 0.
    `detached`: shards and registry outlive the driver that launched them (stop_cluster ends them).
    `hot_resource`: the custom resource hot shards take instead of `shard_resource` (GPU nodes);
    `hot_device`: where hot shards keep rows ("auto": on a GPU when the Ray cluster has one per hot
    shard). `ready_timeout_s`: the deadline of each wait for shards to serve, register or stop.
    `join_timeout_s`: how long launch waits for nodes offering the shard resources to join (0: they
    must be there already, so a missing resource fails at once; a Kubernetes sidecar that starts
    before the shard pods join gives them time instead of failing into a restart loop)."""

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
    detached: bool = False  # shards and registry outlive the launching driver (stop_cluster ends them)
    hot_resource: str | None = None  # the custom resource a hot shard takes a unit of (None: shard_resource)
    hot_device: str = "auto"  # where hot rows live: "cuda", "cpu", or "auto" (cuda if the cluster has a GPU per hot shard)
    ready_timeout_s: float = 120.0  # deadline of each wait for shards to come up or stop
    join_timeout_s: float = 0.0  # how long launch waits for nodes with the shard resources to join

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
        if not self.shard_resource or self.hot_resource == "":
            raise ValueError("shard_resource and hot_resource must not be empty (hot_resource None: shard_resource)")
        if self.hot_device not in HOT_DEVICES:
            raise ValueError(f"hot_device {self.hot_device!r} must be one of {', '.join(HOT_DEVICES)}")
        if not self.ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s {self.ready_timeout_s} must be > 0")
        if not 0 <= self.join_timeout_s < math.inf:
            raise ValueError(f"join_timeout_s {self.join_timeout_s} must be >= 0 and finite")
        if self.security is not None and self.security.has_tokens and not self.security.is_tls \
                and not is_loopback(self.host):
            raise ValueError(f"tokens without TLS on host {self.host}: clients send tokens only over TLS or "
                             f"to loopback (shards advertise this node's address): set security.cert/key")
        if self.security is not None and not self.security.is_open and self.num_hot and self.security.peer is None:
            raise ValueError("a secured cluster with hot shards needs security.peer: the credentials "
                             "(TLS root, write token) its migration uses on the cold shards")


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
        self.already_running = False  # launch() found this detached cluster running and attached
        self.addresses: list[ShardAddress]
        self.hot_addresses: list[ShardAddress]
        self.addresses, self.hot_addresses = _get(
            [registry.shards.remote(), registry.shards.remote("hot")], config.ready_timeout_s,
            f"the registry of tables cluster {config.name!r}")

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
        """Stop the shards (hot first, then the cold ones flush) and kill the actors if this object
        started them and they are not detached; stop Ray if this object started Ray. Detached
        shards outlive this: `stop_cluster` ends them. (The embedded Ray, started here, takes every
        actor with it when it stops, detached or not.)"""
        if self.owns_actors and not self.config.detached:
            _stop_actors(self.config.name, self.hot_actors, self.actors, self.registry, self.config.ready_timeout_s,
                         drain=self.config.storage.path is not None)  # DRAM-only cold shards keep nothing
        if self.owns_ray:
            ray.shutdown()


def init_local_ray(num_cpus: int | None = None, log_to_driver: bool = False) -> bool:
    """Start the embedded single-machine Ray cluster if none is running in this process.

    Loopback only: its node address is 127.0.0.1, and Ray binds every server of such a node (GCS,
    raylet, object manager, workers, agents) to that address, so nothing of it can be reached
    from another machine (test_cluster_lifetime.py checks every listening socket). Token auth
    off: only this machine's users reach it. Returns True if it started Ray (and so should stop
    it)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray runs workers at nice 15; a shard answers latency-bound requests while the trainer computes
    # beside it on the same cores, and at nice 15 a 16k-row fetch took 2x as long (measured here).
    os.environ.setdefault("RAY_worker_niceness", "0")
    with _loopback_node():
        ray.init(namespace=NAMESPACE, num_cpus=num_cpus, resources={SHARD_RESOURCE: 4096},
                 include_dashboard=False, log_to_driver=log_to_driver, configure_logging=False)
    if not is_loopback(ray.util.get_node_ip_address()):  # Ray changed how it picks the address
        ray.shutdown()
        raise ClusterError("the embedded Ray cluster did not take a loopback node address: its servers "
                           "would listen on every interface")
    _embedded.add(ray.get_runtime_context().gcs_address)
    return True


@contextmanager
def _loopback_node():
    """Within: a Ray started here takes 127.0.0.1 as its node address. Ray does so where
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0 (its default on macOS and Windows), but reads that
    once, into ray_constants, when `ray` is imported: setting the variable now, as this module
    did before, left the node on the host's address with every server on 0.0.0.0 (`ss -ltnp`:
    `*:PORT`). After: both as they were, so a later `ray.init(address=...)` of this process
    joins a remote cluster with an address it can reach."""
    from ray._private import ray_constants

    before = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before[1]
        if before[0] is None:
            del os.environ[LOOPBACK_ENV]
        else:
            os.environ[LOOPBACK_ENV] = before[0]


_embedded: set[str] = set()  # GCS addresses of the embedded clusters this process started


def _is_embedded() -> bool:
    """Whether this process's Ray is an embedded cluster it started (and that ends with it)."""
    return ray.is_initialized() and ray.get_runtime_context().gcs_address in _embedded


def attach_ray(address: str | None = None, log_to_driver: bool = False) -> bool:
    """Join the Ray cluster at `address` ("auto": the one running on this machine), or at
    $RAY_ADDRESS when `address` is None (Ray's own rule: inside a KubeRay pod or a Ray job it is
    set); with neither, start the embedded local cluster (init_local_ray). `log_to_driver`: the
    actors' output (shard warnings) is printed by this process too. Returns True if this call
    started or joined Ray (the caller then stops it: `ray.shutdown()`)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return init_local_ray(log_to_driver=log_to_driver)
    try:
        address = _gcs_address(address)
        # a cluster on loopback (the embedded one of another process): this driver's node address
        # must be loopback too, or Ray looks for a raylet at the host's address and waits forever
        with _loopback_node() if is_loopback(address.rsplit(":", 1)[0]) else nullcontext():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=log_to_driver)  # no resources=
    except ConnectionError as err:
        raise ClusterError(f"no Ray cluster at {address!r} ({err}); start one with `ray start --head`, "
                           f"or give its address") from None
    return True


def _gcs_address(address: str) -> str:
    """`address` with "auto" replaced as Ray replaces it (the cluster `ray start` last started
    here, else any running on this machine); ConnectionError if there is none."""
    if address != "auto":
        return address
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment("auto", None)


def _attach_existing(address: str | None) -> bool:
    """attach_ray for commands that need a running Ray cluster: never the embedded one."""
    return attach_ray(address or os.environ.get("RAY_ADDRESS") or "auto")


def needed_resources(config: ClusterConfig) -> dict[str, float]:
    """Ray resources the shards of `config` take, by name."""
    hot = config.hot_resource or config.shard_resource
    need = {config.shard_resource: float(config.num_shards)}
    need[hot] = need.get(hot, 0.0) + config.num_hot
    if config.num_hot and config.hot_device == "cuda":
        need["GPU"] = float(config.num_hot)
    if config.num_cpus_per_shard:
        need["CPU"] = config.num_cpus_per_shard * (config.num_shards + config.num_hot)
    return {k: v for k, v in need.items() if v}


def check_resources(config: ClusterConfig, wait_s: float = RESOURCE_WAIT_S) -> None:
    """Raise ClusterError, with the fix, unless the Ray cluster's nodes have the resources the
    shards take free. Without this, a shard asking for a resource no node offers waits in Ray's
    queue forever. Nodes declare resources when they join, so too few in total fails once
    `config.join_timeout_s` has passed (at once by default); units in use are waited on for
    `wait_s` more (the free counts lag an actor's end by a moment)."""
    need = needed_resources(config)
    start = time.monotonic()
    if config.join_timeout_s:
        log.info("waiting up to %g s for Ray nodes offering %s", config.join_timeout_s, need)
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        short = {k: v for k, v in need.items() if free.get(k, 0.0) < v}
        if not short:
            return
        elapsed = time.monotonic() - start
        missing = any(total.get(k, 0.0) < v for k, v in short.items())
        if elapsed >= config.join_timeout_s + wait_s or (missing and elapsed >= config.join_timeout_s):
            raise ClusterError(_shortage(config, short, total, free))
        time.sleep(0.25)


def _shortage(config: ClusterConfig, short: dict[str, float], total: dict, free: dict) -> str:
    """One line: the first resource the shards lack, and how to get it."""
    name, needed = next(iter(short.items()))
    count = f"needed: {needed:g} for tables cluster {config.name!r}"
    if name == "GPU":
        return (f"hot_device 'cuda' needs a GPU per hot shard, the Ray cluster has {total.get(name, 0):g} free "
                f"{free.get(name, 0):g} ({count}); start GPU nodes, or set hot_device auto or cpu")
    if name == "CPU":
        return f"not enough free CPUs ({free.get(name, 0):g}, {count}); lower num_cpus_per_shard or add nodes"
    declare = f"ray start --resources='{{\"{name}\": {needed:g}}}'"
    if total.get(name, 0) == 0:
        return f"no Ray node offers resource '{name}' ({count}); start nodes with {declare}"
    if total[name] < needed:
        return (f"the Ray cluster's nodes offer {total[name]:g} units of resource '{name}' ({count}); "
                f"add nodes with {declare}")
    return (f"{total[name] - free.get(name, 0):g} of {total[name]:g} units of resource '{name}' are taken "
            f"by other actors ({count}): other tables clusters? `engram stop --name NAME` ends one")


def launch(config: ClusterConfig, owns_ray: bool = False) -> TableCluster:
    """Start `config.num_shards` cold and `config.num_hot` hot shard actors and wait (at most
    `config.ready_timeout_s` each for cold and hot) until every one serves gRPC. A detached cluster
    of this name that already runs with this shape is attached to instead; any other cluster of
    this name is an error. Checks that the Ray cluster offers the resources; on any failure, kills
    what it started."""
    warn_if_exposed(config.host, config.security)  # here too: an actor's warning stays in its log
    if _registry_or_none(config.name) is not None:
        if config.detached:  # launched before: attach to it (launching again is then harmless)
            return _running(config, owns_ray)
        raise ClusterError(f"tables cluster {config.name!r} already runs on this Ray cluster: attach to it, or "
                           f"stop it first (engram stop --name {config.name})")
    if config.detached and _is_embedded():
        declare = f"""ray start --head --resources='{{"{config.shard_resource}": {config.num_shards + config.num_hot}}}'"""
        raise ClusterError(f"detached shards need a Ray cluster that outlives this process, and the embedded one "
                           f"ends with it: start one with `{declare}` and pass --address auto")
    check_resources(config)
    if config.storage.path is None:
        log.warning("cluster %r: shards without storage.path keep their rows only in DRAM: a crashed "
                    "shard loses them and is not restarted", config.name)
    lifetime = {"lifetime": "detached"} if config.detached else {}
    # on the head node: the registry must outlive any shard node (see server/registry.py)
    registry = Registry.options(name=registry_name(config.name), namespace=NAMESPACE,
                                resources={HEAD_NODE_RESOURCE: 0.001}, **lifetime) \
        .remote(config.num_shards, config.num_hot, config.name)
    actors: list = []
    hot_actors: list = []
    try:
        actors = _start_cold(config, lifetime)
        cold = _wait_serving(actors, "cold", config)
        hot_actors = _start_hot(config, [a.target for a in cold], lifetime)
        _wait_serving(hot_actors, "hot", config)
        return TableCluster(config, actors, registry, owns_ray, hot_actors=hot_actors)
    except BaseException:
        for actor in [*hot_actors, *actors, registry]:
            ray.kill(actor, no_restart=True)
        raise


def _start_cold(config: ClusterConfig, lifetime: dict) -> list:
    shards = config.num_shards + config.num_hot
    # a restarted shard recovers from its files; actor calls a crash interrupted are re-run (all are safe to)
    restarts = {} if config.storage.path is None else dict(
        max_restarts=config.max_restarts, max_task_retries=config.max_restarts)
    return [
        ShardActor.options(num_cpus=config.num_cpus_per_shard, resources={config.shard_resource: 1},
                           name=shard_name(config.name, "cold", i), namespace=NAMESPACE,
                           runtime_env={"env_vars": shard_env(config.storage)}, **restarts, **lifetime)
        .remote(i, config.num_shards, config.host, config.port, registry_name(config.name), config.metrics_port,
                config.name, shards, track_accesses=config.num_hot > 0, storage=config.storage.for_shard(i),
                security=config.security, niceness=config.niceness)
        for i in range(config.num_shards)
    ]


def _start_hot(config: ClusterConfig, cold_targets: list[str], lifetime: dict) -> list:
    device = hot_device(config)
    migration = dict(cold_targets=cold_targets, capacity=config.hot_rows,
                     policy=config.placement, interval_s=config.migrate_interval_s,
                     max_duty=config.migrate_max_duty,
                     security=config.security.peer if config.security is not None else None)
    return [
        ShardActor.options(num_cpus=config.num_cpus_per_shard, num_gpus=1 if device == "cuda" else 0,
                           resources={config.hot_resource or config.shard_resource: 1},
                           name=shard_name(config.name, "hot", i), namespace=NAMESPACE,
                           runtime_env={"env_vars": SHARD_ENV}, **lifetime)
        .remote(i, config.num_hot, config.host, config.port, registry_name(config.name), config.metrics_port,
                config.name, config.num_shards + config.num_hot, role="hot", track_accesses=True,
                migration=migration, security=config.security, niceness=config.niceness,
                device=device)  # rows in its GPU's memory
        for i in range(config.num_hot)
    ]


def hot_device(config: ClusterConfig) -> str | None:
    """"cuda" when hot shards keep their rows on a GPU (hot_device cuda, or auto and the Ray
    cluster has a GPU for each hot shard), else None (DRAM)."""
    if config.num_hot == 0 or config.hot_device == "cpu":
        return None
    if config.hot_device == "cuda" or ray.cluster_resources().get("GPU", 0) >= config.num_hot:
        return "cuda"
    return None


def _wait_serving(actors: list, role: str, config: ClusterConfig) -> list[ShardAddress]:
    """Each actor's address once it serves; ClusterError naming those not serving by the deadline.
    An actor whose constructor failed raises its error here."""
    refs = [a.get_address.remote() for a in actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=config.ready_timeout_s)
    if pending:
        late = [i for i, ref in enumerate(refs) if ref in pending]
        raise ClusterError(f"{role} shards {late} of tables cluster {config.name!r} not serving after "
                           f"{config.ready_timeout_s:g} s (ready_timeout_s): see `ray status` for pending "
                           f"resources and the shard actors' logs")
    return ray.get(refs)


def _get(refs, timeout_s: float, what: str):
    """ray.get with a deadline: ClusterError naming `what` did not answer."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"{what} did not answer within {timeout_s:g} s") from None


def _stop_actors(name: str, hot: list, cold: list, registry, timeout_s: float, drain: bool) -> None:
    """Stop the hot shards (their migration ends: no row moves while the cold shards flush; with
    `drain`, each first moves its rows back to the cold shards), then the cold ones (each flushes
    its dirty rows), then kill every actor and the registry. Raises ClusterError after killing
    them if a shard did not stop cleanly (a cold shard's write-ahead log keeps what it did not
    flush; a hot shard's rows are lost as in a crash)."""
    unclean = []
    for role, group in (("hot", hot), ("cold", cold)):
        refs = [a.stop.remote(drain=drain) for a in group]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for i, ref in enumerate(refs):
            try:
                if ref not in ready:
                    raise TimeoutError(f"no answer in {timeout_s:g} s")
                ray.get(ref)
            except Exception as err:
                unclean.append(f"{role} {i}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    for actor in [*hot, *cold, registry]:
        ray.kill(actor, no_restart=True)
    if unclean:
        raise ClusterError(f"tables cluster {name!r} removed, but not every shard stopped cleanly: {'; '.join(unclean)}")


def _registry_or_none(name: str):
    try:
        return ray.get_actor(registry_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def find_registry(name: str):
    """The registry actor of tables cluster `name`; ClusterNotFound (naming those that run) if none."""
    registry = _registry_or_none(name)
    if registry is None:
        running = sorted(a["name"].split(":", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["namespace"] == NAMESPACE and a["name"].startswith(registry_name("")))
        raise ClusterNotFound(f"no tables cluster {name!r} on this Ray cluster (running: "
                              f"{', '.join(map(repr, running)) or 'none'}); `engram serve --name {name}` starts one")
    return registry


def start_local(num_shards: int = 2, num_hot: int = 1, niceness: int = LOCAL_NICENESS, **kwargs) -> TableCluster:
    """Embedded default: a local Ray cluster started on demand, with `num_shards` cold shards and
    `num_hot` hot shards, at `niceness` (they share this host's cores with the trainer). With
    $RAY_ADDRESS set (inside a KubeRay pod, a Ray job) it launches them on that cluster instead."""
    config = ClusterConfig(num_shards=num_shards, num_hot=num_hot, niceness=niceness, **kwargs)
    owns_ray = attach_ray(None)
    try:
        return launch(config, owns_ray=owns_ray)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise


def connect(address: str | None = None, num_shards: int | None = None, **kwargs) -> TableCluster:
    """Attach to a running Ray cluster at `address` (None: $RAY_ADDRESS, else "auto"). With
    `num_shards`, start that many shards there; without, find the shards another driver started
    under the cluster name (ClusterNotFound if there are none)."""
    config = ClusterConfig(**kwargs) if num_shards is None else ClusterConfig(num_shards=num_shards, **kwargs)
    owns_ray = _attach_existing(address)
    try:
        return launch(config, owns_ray=owns_ray) if num_shards is not None else _find(config, owns_ray)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise


def _find(config: ClusterConfig, owns_ray: bool) -> TableCluster:
    """The TableCluster of shards another driver started under `config.name`, once all registered."""
    registry = find_registry(config.name)
    what = f"the registry of tables cluster {config.name!r}"
    expected, num_hot = _get([registry.get_num_shards.remote(), registry.get_num_hot.remote()],
                             config.ready_timeout_s, what)
    deadline = time.monotonic() + config.ready_timeout_s
    for role, count in (("cold", expected), ("hot", num_hot)):
        while len(_get(registry.shards.remote(role), config.ready_timeout_s, what)) < count:
            if time.monotonic() > deadline:
                raise ClusterError(f"only some of the {count} {role} shards of tables cluster {config.name!r} "
                                   f"registered within {config.ready_timeout_s:g} s (ready_timeout_s)")
            time.sleep(0.2)
    actors = [_named(config.name, "cold", i) for i in range(expected)]
    hot = [_named(config.name, "hot", i) for i in range(num_hot)]
    return TableCluster(replace(config, num_shards=expected, num_hot=num_hot), actors, registry, owns_ray,
                        owns_actors=False, hot_actors=hot)


def _running(config: ClusterConfig, owns_ray: bool) -> TableCluster:
    """The detached tables cluster `config.name` that already runs, if it has `config`'s shape: a
    launcher started again (a restarted sidecar, a rerun script) attaches instead of failing."""
    cluster = _find(config, owns_ray)
    have = (cluster.config.num_shards, cluster.config.num_hot)
    if have != (config.num_shards, config.num_hot):
        raise ClusterError(f"tables cluster {config.name!r} already runs with {have[0]} cold and {have[1]} hot "
                           f"shards, not {config.num_shards} and {config.num_hot}: stop it first "
                           f"(engram stop --name {config.name}) or pick another name")
    log.info("tables cluster %r already runs (detached): attached to it", config.name)
    cluster.already_running = True
    return cluster


def _named(cluster: str, role: str, shard_id: int):
    try:
        return ray.get_actor(shard_name(cluster, role, shard_id), namespace=NAMESPACE)
    except ValueError:
        raise ClusterError(f"{role} shard {shard_id} of tables cluster {cluster!r} is gone (its actor died "
                           f"and was not restarted): stop the cluster and serve it again") from None


def stop_cluster(name: str, address: str | None = None, timeout_s: float = 60.0) -> int:
    """Stop tables cluster `name` on the Ray cluster at `address` (None: $RAY_ADDRESS, else
    "auto"): every hot shard stops migrating and moves its rows back to the cold shards, every
    cold shard flushes, then their actors and the registry are killed (waits at most `timeout_s` for each group). Returns the number of shards
    stopped; ClusterNotFound if no such cluster runs."""
    owns_ray = _attach_existing(address)
    try:
        registry = find_registry(name)
        num_cold, num_hot = _get([registry.get_num_shards.remote(), registry.get_num_hot.remote()], timeout_s,
                                 f"the registry of tables cluster {name!r}")
        cold = [a for i in range(num_cold) if (a := _actor_or_none(shard_name(name, "cold", i)))]
        hot = [a for i in range(num_hot) if (a := _actor_or_none(shard_name(name, "hot", i)))]
        _stop_actors(name, hot, cold, registry, timeout_s, drain=True)
        return len(cold) + len(hot)
    finally:
        if owns_ray:
            ray.shutdown()


def _actor_or_none(actor_name: str):
    try:
        return ray.get_actor(actor_name, namespace=NAMESPACE)
    except ValueError:
        return None
