"""A bench harness: the embedded cluster's shards as plain local processes, for a machine where Ray
cannot be installed (the lent GPU machine: Ray's wheel is over what can be carried to it). Not
part of the service, which runs on Ray only: the shards here are the real ones (`Shard`, its gRPC
servicer, the hot shard's `Migrator`), only started by `subprocess` instead of Ray.

`start_processes()` starts each shard as `python bench/shard_processes.py '<json>'`, an
all-DRAM `Shard` serving gRPC on 127.0.0.1 (a free port, printed back as one JSON line), the cold
shards first, then the hot shards with their migrator over the cold ones and their rows on
`hot_device`. The handle's `client()` is the cluster's MemoryClient, as `TableCluster.client()`.
Why: a GPU machine carrying only what the project lacks there cannot carry Ray (its wheel is
79 MB), and one machine needs no scheduler to run three shards. A shard process ends when its
stdin closes, so shards never outlive the process that started them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)  # so this and each child import this checkout
sys.path.insert(0, REPO_ROOT)

from memory_service.server.shard_process import LOCAL_NICENESS, SHARD_ENV, set_priority  # noqa: E402



@dataclass
class LocalShards:
    """Handles of shard processes: cold shards in shard order, then hot shards."""

    procs: list[subprocess.Popen]
    targets: list[str]  # the cold shards' gRPC targets
    hot_targets: list[str] = field(default_factory=list)
    niceness: int = LOCAL_NICENESS

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def client(self, **kwargs):
        from memory_service.client import MemoryClient

        return MemoryClient(self.targets, hot_targets=self.hot_targets, **kwargs)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Closes each shard's stdin (hot shards first: their migration stops before the cold
        shards do) and waits for it to stop serving and exit; kills one that does not."""
        num_cold = len(self.targets)
        for proc in self.procs[num_cold:] + self.procs[:num_cold]:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalShards":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_processes(num_shards: int = 2, num_hot: int = 1, hot_rows: int = 65536,
                    niceness: int = LOCAL_NICENESS, hot_device: str | None = None, placement: str = "engram",
                    migrate_interval_s: float = 0.05, migrate_max_duty: float = 0.05) -> LocalShards:
    """`num_shards` cold and `num_hot` hot all-DRAM shards in processes of their own at CPU
    priority `niceness` (the defaults are start_local's); hot shards keep `hot_rows` rows per
    table, on `hot_device` (a torch device name; None: host DRAM)."""
    if num_shards < 1 or not 0 <= num_hot <= 64 or not 0 <= niceness <= 19:
        raise ValueError(f"num_shards {num_shards} must be >= 1, num_hot {num_hot} in [0, 64] "
                         f"and niceness {niceness} in [0, 19]")
    procs: list[subprocess.Popen] = []
    try:
        cold = [_spawn(procs, dict(shard_id=i, num_shards=num_shards, role="cold",
                                   track_accesses=num_hot > 0, niceness=niceness)) for i in range(num_shards)]
        migration = dict(cold_targets=cold, capacity=hot_rows, policy=placement,
                         interval_s=migrate_interval_s, max_duty=migrate_max_duty)
        hot = [_spawn(procs, dict(shard_id=i, num_shards=num_hot, role="hot", track_accesses=True,
                                  niceness=niceness, device=hot_device, migration=migration))
               for i in range(num_hot)]
    except BaseException:
        LocalShards(procs, []).shutdown(timeout=5.0)
        raise
    return LocalShards(procs, cold, hot, niceness)


def start_embedded(kind: str, device: str, name: str, niceness: int | None = None):
    """The embedded cluster the benches train beside (2 cold + 1 hot shards, a hot shard with a
    GPU keeps its rows there): Ray actors by `start_local` (`kind` "ray") or processes of this
    module ("processes"). Returns it, its shards' pids and their niceness (None: start_local's)."""
    nice = {} if niceness is None else {"niceness": niceness}
    if kind == "processes":
        shards = start_processes(num_shards=2, hot_device="cuda" if device == "cuda" else None, **nice)
        return shards, shards.pids, shards.niceness
    import ray

    from memory_service.cluster import start_local

    cluster = start_local(num_shards=2, name=name, **nice)  # a hot shard with a GPU gets it
    return cluster, ray.get([a.pid.remote() for a in [*cluster.actors, *cluster.hot_actors]]), cluster.config.niceness


def _spawn(procs: list[subprocess.Popen], spec: dict) -> str:
    """Starts one shard process (appended to `procs`) and returns its gRPC target once it serves."""
    env = {**os.environ, **SHARD_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    procs.append(proc)
    line = proc.stdout.readline()  # "" if the process died first
    if not line:
        raise RuntimeError(f"{spec['role']} shard {spec['shard_id']} exited with code {proc.wait()} "
                           f"before serving (its stderr is above)")
    return json.loads(line)["target"]


def serve_until_stdin_closes(spec: dict) -> None:
    """The child: one shard serving on a free loopback port until its stdin closes."""
    from memory_service.server.servicer import serve
    from memory_service.shard.shard import Shard

    set_priority(spec["niceness"])  # before serve(): the gRPC threads inherit it
    shard = Shard(spec["shard_id"], spec["num_shards"], role=spec["role"],
                  track_accesses=spec["track_accesses"], device=spec.get("device"))
    server = serve(shard, host="127.0.0.1", port=0)
    migrator = None
    if spec.get("migration") is not None:  # a hot shard places rows between the cold shards and itself
        from memory_service.server.migration import Migrator

        migrator = Migrator(shard, **spec["migration"]).start()
    print(json.dumps({"target": server.address, "pid": os.getpid()}), flush=True)
    sys.stdin.read()  # returns when the parent closes our stdin, or dies
    if migrator is not None:
        migrator.stop()
        migrator.close()
    server.stop(1.0)
    shard.close()


if __name__ == "__main__":
    serve_until_stdin_closes(json.loads(sys.argv[1]))
