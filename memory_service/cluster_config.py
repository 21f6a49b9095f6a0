"""How and where a tables cluster's shards run: `ClusterConfig`, checked once when built.

memory_service/cluster.py launches, finds and stops the shards it describes; config_file.py reads it
from YAML. Kept apart from cluster.py so the modules below cluster (cluster_resources.py,
ray_attach.py) can read it without importing the launcher."""
from __future__ import annotations

import math
from dataclasses import dataclass

from memory_service.config import StorageConfig
from memory_service.placement import DEFAULT_POLICY
from memory_service.shard.quotas import NamespaceQuota
from memory_service.wire.security import SecurityConfig, is_loopback

SHARD_RESOURCE = "engram_shard"
HOT_DEVICES = ("auto", "cuda", "cpu")


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
    shards keep rows: all in DRAM by default; with `storage.path`, each cold shard has its LMDB
    files and write-ahead log in its own subdirectory `shard-NNNN` of that path
    (StorageConfig.for_shard), and each hot shard keeping rows in host DRAM one `hot-NNNN`
    (for_hot_shard). Such a shard is restarted by Ray up to `max_restarts` times (-1: always)
    after a crash, and recovers from its files; all-DRAM shards and hot shards keeping rows on a
    GPU are never restarted.
    `niceness` is the shards' CPU priority (0 normal, 19 lowest): shards sharing a host's cores with
    a trainer (the embedded cluster) should yield to it, or each of their bursts stalls the
    trainer's whole intra-op parallel region; shards on hosts of their own keep 0.
    `detached`: shards and registry outlive the driver that launched them (stop_cluster ends them).
    `hot_resource`: the custom resource hot shards take instead of `shard_resource` (GPU nodes);
    `hot_device`: where hot shards keep rows ("auto": on a GPU when the Ray cluster has one per hot
    shard). `ready_timeout_s`: the deadline of each wait for shards to serve, register or stop.
    `join_timeout_s`: how long launch waits for nodes offering the shard resources to join (0: they
    must be there already, so a missing resource fails at once; a Kubernetes sidecar that starts
    before the shard pods join gives them time instead of failing into a restart loop).
    `quotas`: the most rows and bytes each namespace's tables may store (shard/quotas.py: each cold
    shard enforces its share, rows moved to hot shards counted by the cold shard they left)."""

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
    quotas: tuple[NamespaceQuota, ...] = ()  # per namespace: max rows and bytes stored (None: no quotas)

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
        if isinstance(self.quotas, (str, dict)) or not all(isinstance(q, NamespaceQuota) for q in self.quotas):
            raise ValueError("quotas must be a tuple of NamespaceQuota")
        if len({q.namespace for q in self.quotas}) != len(self.quotas):
            raise ValueError(f"quotas name a namespace twice: {sorted(q.namespace for q in self.quotas)}")
        if self.security is not None and self.security.has_tokens and not self.security.is_tls \
                and not is_loopback(self.host):
            raise ValueError(f"tokens without TLS on host {self.host}: clients send tokens only over TLS or "
                             f"to loopback (shards advertise this node's address): set security.cert/key")
        if self.security is not None and not self.security.is_open and self.num_hot and self.security.peer is None:
            raise ValueError("a secured cluster with hot shards needs security.peer: the credentials "
                             "(TLS root, write token) its migration uses on the cold shards")
