"""The Ray resources a tables cluster's shards take, and the check that the Ray cluster offers them.

A shard actor asking for a resource no node offers waits in Ray's queue forever, so launch()
(memory_service/cluster.py) calls `check_resources` first; its error names the missing resource
and how to get it. `hot_device` decides whether hot shards keep their rows on a GPU."""
from __future__ import annotations

import logging
import time

import ray

from memory_service.cluster_config import ClusterConfig
from memory_service.errors import ClusterError

log = logging.getLogger(__name__)
RESOURCE_WAIT_S = 2.0  # how long launch() waits for resource units in use to be freed


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


def hot_device(config: ClusterConfig) -> str | None:
    """"cuda" when hot shards keep their rows on a GPU (hot_device cuda, or auto and the nodes
    offering the hot resource have a GPU for each hot shard), else None (DRAM). GPUs on other
    nodes (trainers') do not count: a hot shard asking for one beside its resource would never
    be scheduled."""
    if config.num_hot == 0 or config.hot_device == "cpu":
        return None
    if config.hot_device == "cuda" or _gpus_beside(config.hot_resource or config.shard_resource) >= config.num_hot:
        return "cuda"
    return None


def _gpus_beside(resource: str) -> float:
    """How many hot shards could each get a GPU on a node that offers `resource`."""
    return sum(min(node["Resources"].get("GPU", 0.0), node["Resources"].get(resource, 0.0))
               for node in ray.nodes() if node["Alive"])
