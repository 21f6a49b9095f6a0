"""ShardAddress: where one shard serves, as it registers itself and as clients reach it.

A value type of its own, below both the shard actor that registers it and the cluster's registry
and handles that read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardAddress:
    """Shard (role, shard_id)'s gRPC and metrics ports on `host`."""

    shard_id: int
    host: str
    port: int
    metrics_port: int = 0  # the shard's Prometheus endpoint, http://host:metrics_port/metrics; 0: none
    role: str = "cold"  # "cold": home of rows id % num_shards; "hot": of the hot rows id % num_hot

    @property
    def target(self) -> str:
        """gRPC target, "host:port"."""
        return f"{self.host}:{self.port}"
