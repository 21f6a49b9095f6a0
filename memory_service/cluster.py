"""Tables clusters on Ray: launch, find (through a named registry actor) and stop the shard actors.

`start_local()` starts an embedded local Ray cluster on demand (the default: demo, tests);
`connect(address)` attaches to a running Ray cluster (`ray start --head`, KubeRay). Either way the
shard actors are real Ray actors placed with a custom resource (`engram_shard` by default,
`ClusterConfig.shard_resource`), so a deployment pins shards to nodes by declaring that resource
only where shards should run (deploy/: one unit per shard pod). The actor itself, a shard serving
gRPC, is memory_service/server/shard_actor.py; this module starts, finds and stops them.
`attach_ray(address)` (ray_attach.py) joins Ray as Ray does: `address`, else $RAY_ADDRESS (set
inside a KubeRay pod or a Ray job), else the embedded cluster. `launch()` first checks that the Ray
cluster's nodes offer the shards' resources (cluster_resources.py: a shard waiting for a resource no
node offers would wait forever), and every wait has a deadline (`ready_timeout_s`).

Lifetime. Shards belong to the driver that launched them and die with it, unless
`ClusterConfig.detached`: then shards and registry are detached Ray actors that keep serving after
the launcher exits (`engram serve --detach`), and `stop_cluster(name)` (`engram stop`) ends them.

Crashes. With a disk directory (`storage.path`) every shard, cold (`shard-NNNN`) or hot
(`hot-NNNN`, rows in host DRAM), is restarted by Ray after a crash (`ClusterConfig.max_restarts`):
the new process recovers every acknowledged change from its LMDB files and write-ahead log, binds
the port its predecessor had (read from the registry, which outlives it) and re-registers;
clients' channels reconnect by themselves and re-send what failed, and a hot shard's migrator
finishes the move the crash interrupted (server/migration.py). On SIGTERM (Kubernetes stopping a
pod) a shard stops serving, flushes and exits. All-DRAM shards and hot shards keeping rows on a
GPU are not restarted: their rows die with their process (a restart would serve empty tables).
`TableCluster.watch` reports shards that restarted and those that died for good (`engram serve`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import ray

# ClusterConfig and attach_ray are re-exported: config_file.py and the CLI reach them through this door
from memory_service.cluster_config import ClusterConfig
from memory_service.config import StorageConfig
from memory_service.cluster_resources import check_resources, hot_device
from memory_service.errors import ClusterError, ClusterNotFound
from memory_service.ray_attach import attach_existing, attach_ray, is_embedded  # noqa: F401
from memory_service.server.registry import NAMESPACE, Registry, registry_name, shard_name
from memory_service.server.shard_actor import ShardActor
from memory_service.server.shard_address import ShardAddress
# shard_env is re-exported: a cold shard's malloc settings, which tests apply to a plain process
from memory_service.server.shard_process import LOCAL_NICENESS, SHARD_ENV, shard_env  # noqa: F401
from memory_service.wire.security import warn_if_exposed

log = logging.getLogger(__name__)
HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head node has one unit (Ray Train pins its state actor so)


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

    def watch(self):
        """A ShardWatch (cluster_watch.py) of every shard actor: restarts and deaths as they happen."""
        from memory_service.cluster_watch import ShardWatch

        return ShardWatch({**{("cold", i): a for i, a in enumerate(self.actors)},
                           **{("hot", i): a for i, a in enumerate(self.hot_actors)}}, self.config.ready_timeout_s)

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




def launch(config: ClusterConfig, owns_ray: bool = False) -> TableCluster:
    """Start `config.num_shards` cold and `config.num_hot` hot shard actors and wait (at most
    `config.ready_timeout_s` each for cold and hot) until every one serves gRPC. A detached cluster
    of this name that already runs with this shape is attached to instead; any other cluster of
    this name is an error. Checks that the Ray cluster offers the resources; on any failure, kills
    what it started."""
    warn_if_exposed(config.host, config.security)  # here too: an actor's warning stays in its log
    if _actor_or_none(registry_name(config.name)) is not None:
        if config.detached:  # launched before: attach to it (launching again is then harmless)
            return _running(config, owns_ray)
        raise ClusterError(f"tables cluster {config.name!r} already runs on this Ray cluster: attach to it, or "
                           f"stop it first (engram stop --name {config.name})")
    if config.detached and is_embedded():
        declare = f"""ray start --head --resources='{{"{config.shard_resource}": {config.num_shards + config.num_hot}}}'"""
        raise ClusterError(f"detached shards need a Ray cluster that outlives this process, and the embedded one "
                           f"ends with it: start one with `{declare}` and pass --address auto")
    check_resources(config)
    if config.storage.path is None:
        log.warning("cluster %r: shards without storage.path keep their rows only in DRAM: a crashed "
                    "shard loses them and is not restarted", config.name)
    elif config.num_hot and hot_device(config) is not None:
        log.warning("cluster %r: hot shards keeping rows on a GPU have no disk directory: a crashed hot "
                    "shard loses the rows it is home of and is not restarted (hot_device: cpu makes them "
                    "durable)", config.name)
    lifetime = {"lifetime": "detached"} if config.detached else {}
    # on the head node: the registry must outlive any shard node (see server/registry.py)
    try:
        registry = Registry.options(name=registry_name(config.name), namespace=NAMESPACE,
                                    resources={HEAD_NODE_RESOURCE: 0.001}, **lifetime) \
            .remote(config.num_shards, config.num_hot, config.name)
    except ValueError:  # another launcher of this name got there between the check above and here
        raise ClusterError(f"tables cluster {config.name!r} is being started by another launcher; "
                           f"run engram serve again once it serves (detached: it attaches)") from None
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


def _restarts(config: ClusterConfig, durable: bool) -> dict:
    """Ray's restart options of a shard: a durable one (a disk directory) recovers from its files
    after a crash, and actor calls a crash interrupted are re-run (all are safe to)."""
    return dict(max_restarts=config.max_restarts, max_task_retries=config.max_restarts) if durable else {}


def _start_cold(config: ClusterConfig, lifetime: dict) -> list:
    shards = config.num_shards + config.num_hot
    restarts = _restarts(config, config.storage.path is not None)
    return [
        ShardActor.options(num_cpus=config.num_cpus_per_shard, resources={config.shard_resource: 1},
                           name=shard_name(config.name, "cold", i), namespace=NAMESPACE,
                           runtime_env={"env_vars": shard_env(config.storage)}, **restarts, **lifetime)
        .remote(i, config.num_shards, config.host, config.port, registry_name(config.name), config.metrics_port,
                config.name, shards, track_accesses=config.num_hot > 0, storage=config.storage.for_shard(i),
                security=config.security, niceness=config.niceness, quotas=config.quotas)
        for i in range(config.num_shards)
    ]


def _start_hot(config: ClusterConfig, cold_targets: list[str], lifetime: dict) -> list:
    device = hot_device(config)
    durable = config.storage.path is not None and device is None  # a GPU arena has no disk under it
    migration = dict(cold_targets=cold_targets, capacity=config.hot_rows,
                     policy=config.placement, interval_s=config.migrate_interval_s,
                     max_duty=config.migrate_max_duty,
                     security=config.security.peer if config.security is not None else None)
    return [
        ShardActor.options(num_cpus=config.num_cpus_per_shard, num_gpus=1 if device == "cuda" else 0,
                           resources={config.hot_resource or config.shard_resource: 1},
                           name=shard_name(config.name, "hot", i), namespace=NAMESPACE,
                           runtime_env={"env_vars": shard_env(config.storage) if durable else SHARD_ENV},
                           **_restarts(config, durable), **lifetime)
        .remote(i, config.num_hot, config.host, config.port, registry_name(config.name), config.metrics_port,
                config.name, config.num_shards + config.num_hot, role="hot", track_accesses=True,
                migration=migration, security=config.security, niceness=config.niceness,
                storage=(config.storage.for_hot_shard(i) if durable
                         else StorageConfig(checkpoint_root=config.storage.checkpoint_dir)),  # rows in DRAM; its checkpoint root
                device=device)  # None: host DRAM (over LMDB when durable); "cuda": its GPU's memory
        for i in range(config.num_hot)
    ]




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


def find_registry(name: str):
    """The registry actor of tables cluster `name`; ClusterNotFound (naming those that run) if none."""
    registry = _actor_or_none(registry_name(name))
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
    owns_ray = attach_existing(address)
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
    actor = _actor_or_none(shard_name(cluster, role, shard_id))
    if actor is None:
        raise ClusterError(f"{role} shard {shard_id} of tables cluster {cluster!r} is gone (its actor died "
                           f"and was not restarted): stop the cluster and serve it again")
    return actor


def stop_cluster(name: str, address: str | None = None, timeout_s: float = 60.0) -> int:
    """Stop tables cluster `name` on the Ray cluster at `address` (None: $RAY_ADDRESS, else
    "auto"): every hot shard stops migrating and moves its rows back to the cold shards, every
    cold shard flushes, then their actors and the registry are killed (waits at most `timeout_s` for each group). Returns the number of shards
    stopped; ClusterNotFound if no such cluster runs."""
    owns_ray = attach_existing(address)
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
    """The named actor of this service's namespace (a registry, a shard), or None if none lives."""
    try:
        return ray.get_actor(actor_name, namespace=NAMESPACE)
    except ValueError:
        return None
