"""Registry: the named actor through which any driver finds one tables cluster's shards, and
through which a restarted shard finds the address clients know it by.

It holds (role, shard id) -> ShardAddress in memory. It is restarted by Ray when its process dies
(`max_restarts=-1`) and lives on the head node (the node whose loss ends the Ray cluster anyway),
not on a shard's node whose loss would take it along. A restarted registry has lost its map: it
asks every shard of the cluster, by actor name, where it serves, in a thread of its own (a shard
restarting at that moment asks the registry in its constructor; answering it from the constructor
would wait on that very shard). A shard that restarts before the map is back binds a fresh port
and registers that (its clients' channels then fail over to the address the registry gives).
"""
from __future__ import annotations

import threading

import ray

from memory_service.server.shard_address import ShardAddress

NAMESPACE = "engram_memory"  # named actors are per namespace: every driver must use this one
ROLES = ("cold", "hot")
RECOVER_TIMEOUT_S = 30.0  # a restarted registry's wait on each shard's address


def registry_name(cluster: str) -> str:
    return f"engram_registry:{cluster}"


def shard_name(cluster: str, role: str, shard_id: int) -> str:
    """The Ray actor name of shard `shard_id` of role `role` ("cold" or "hot")."""
    return f"engram_{'shard' if role == 'cold' else 'hot'}:{cluster}:{shard_id}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)  # every method is safe to re-run
class Registry:
    """(role, shard id) -> address of the shards of tables cluster `cluster`."""

    def __init__(self, num_shards: int, num_hot: int = 0, cluster: str = "default"):
        self.num_shards, self.num_hot, self.cluster = num_shards, num_hot, cluster
        self.addresses: dict[tuple[str, int], ShardAddress] = {}
        self._lock = threading.Lock()
        if ray.get_runtime_context().was_current_actor_reconstructed:
            threading.Thread(target=self._recover, name="registry-recover", daemon=True).start()

    def _recover(self) -> None:
        """Fill the map again from the shards themselves (after a restart of this actor)."""
        sizes = {"cold": self.num_shards, "hot": self.num_hot}
        for role in ROLES:
            for shard_id in range(sizes[role]):
                try:
                    actor = ray.get_actor(shard_name(self.cluster, role, shard_id), namespace=NAMESPACE)
                    address = ray.get(actor.get_address.remote(), timeout=RECOVER_TIMEOUT_S)
                except Exception:  # gone or not serving: it registers itself when it is back
                    continue
                with self._lock:
                    self.addresses.setdefault((role, shard_id), address)

    def register(self, address: ShardAddress) -> None:
        with self._lock:
            self.addresses[(address.role, address.shard_id)] = address

    def address(self, role: str, shard_id: int) -> ShardAddress | None:
        """Where shard (role, shard_id) served, if it registered (a restarted shard binds it again)."""
        with self._lock:
            return self.addresses.get((role, shard_id))

    def shards(self, role: str = "cold") -> list[ShardAddress]:
        with self._lock:
            return [a for (r, _), a in sorted(self.addresses.items()) if r == role]

    def get_num_shards(self) -> int:
        return self.num_shards

    def get_num_hot(self) -> int:
        return self.num_hot
