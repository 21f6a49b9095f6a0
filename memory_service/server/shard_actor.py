"""ShardActor: one shard as a Ray actor, serving gRPC from inside the actor's process.

The actor builds its `Shard`, serves it (memory_service/server/servicer.py) on the first free port
of its range, or, when Ray restarted it after a crash, on the port its predecessor registered, so
clients' channels reconnect by themselves; then it registers its address with the cluster's named
registry (memory_service/cluster.py). A hot shard also runs the migrator that places rows between
the cold shards and itself. On SIGTERM (Kubernetes stopping a pod) the shard stops serving,
flushes and exits.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time

import ray

from memory_service.config import StorageConfig
from memory_service.server.registry import NAMESPACE
from memory_service.server.shard_address import ShardAddress
from memory_service.server.shard_process import set_priority
from memory_service.shard.shard import Shard
from memory_service.wire.security import SecurityConfig

log = logging.getLogger(__name__)
REGISTRY_TIMEOUT_S = 60.0  # a shard's calls to its cluster's registry (on the head node): a dead head ends them
SIGTERM_GRACE_S = 5.0  # rpcs in flight may finish this long after SIGTERM (Kubernetes waits 30 s by default)


@ray.remote(max_concurrency=4)
class ShardActor:
    """One shard: the plain `Shard` behind a gRPC server started inside the actor's process."""

    def __init__(self, shard_id: int, num_shards: int, host: str, port: int, registry_name: str,
                 metrics_port: int | None = None, cluster: str = "default", port_tries: int = 1,
                 role: str = "cold", track_accesses: bool = False, migration: dict | None = None,
                 storage: StorageConfig | None = None, security: SecurityConfig | None = None,
                 niceness: int = 0, device: str | None = None, quotas: tuple = ()):
        set_priority(niceness)  # before serve(): the gRPC threads inherit this thread's priority
        registry = ray.get_actor(registry_name, namespace=NAMESPACE)
        previous = ray.get(registry.address.remote(role, shard_id), timeout=REGISTRY_TIMEOUT_S)  # set: a restart
        self.shard = Shard(shard_id, num_shards, role=role, track_accesses=track_accesses, storage=storage,
                           device=device, quotas=quotas)  # quotas: cold shards' (shard/quotas.py)
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
        ray.get(registry.register.remote(self.address), timeout=REGISTRY_TIMEOUT_S)
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

    def stop(self, grace: float = 1.0, drain: bool = False) -> int:
        """Stops migrating and serving, then closes the shard (a cold shard writes its dirty rows
        back and empties its write-ahead log). A hot shard with `drain` first moves every row it
        holds back to the cold shards (they must still serve), so a clean stop of the cluster
        loses none; returns how many it moved. Once; later calls do nothing."""
        with self._stop_lock:
            if self._stopped:
                return 0
            self._stopped = True
            try:
                return self.migrator.stop(drain=drain) if self.migrator is not None else 0
            finally:  # a drain that failed leaves its rows hot: they die with the process, as in a crash
                if self.migrator is not None:
                    self.migrator.close()
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
