"""Joining Ray: the embedded loopback-only local cluster, or a running one by address.

`attach_ray(address)` joins Ray as Ray does: `address`, else $RAY_ADDRESS (set inside a KubeRay pod
or a Ray job), else the embedded cluster (`init_local_ray`), which binds every server to 127.0.0.1
and ends with this process. memory_service/cluster.py launches and finds shards on what this joins."""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import ray

from memory_service.cluster_config import SHARD_RESOURCE
from memory_service.errors import ClusterError
from memory_service.server.registry import NAMESPACE
from memory_service.wire.security import is_loopback

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a new local Ray's node address is 127.0.0.1


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
    once, into ray_constants, when `ray` is imported: setting the variable now, as cluster.py
    once did, left the node on the host's address with every server on 0.0.0.0 (`ss -ltnp`:
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


def is_embedded() -> bool:
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
    address = ray_address(address)
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


def ray_address(address: str | None, default: str | None = None) -> str | None:
    """The Ray cluster to join: `address`, else $RAY_ADDRESS (Ray's own rule), else `default`."""
    return address or os.environ.get("RAY_ADDRESS") or default


def attach_existing(address: str | None) -> bool:
    """attach_ray for commands that need a running Ray cluster: never the embedded one."""
    return attach_ray(ray_address(address, default="auto"))


def _gcs_address(address: str) -> str:
    """`address` with "auto" replaced as Ray replaces it (the cluster `ray start` last started
    here, else any running on this machine); ConnectionError if there is none."""
    if address != "auto":
        return address
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment("auto", None)
