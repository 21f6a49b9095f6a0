"""`engram serve` watches its shards (issue 22): a shard Ray restarted after a kill -9 is logged
with the write-ahead log records it replayed and serving goes on; a shard that died for good (its
restarts used up) is logged, the other shards stop cleanly (cold ones flush: their logs are empty)
and serve exits with 1. A real `engram serve` process on this session's Ray cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


class Serve:
    """`engram serve` in a subprocess, its output (stdout and stderr) collected as it comes."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "serve", *args], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, "RAY_ADDRESS": ""})
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None or text in self.output, f"serve exited:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:g} s:\n{self.output}"
            time.sleep(0.2)


def test_serve_logs_a_restart_and_exits_1_once_a_shard_died_for_good(ray_session, tmp_path):
    import ray

    from memory_service.cluster import connect, find_registry
    from memory_service.config import StorageConfig, TableConfig
    from memory_service.errors import ClusterNotFound
    from memory_service.server.registry import NAMESPACE, shard_name
    from memory_service.shard.shard import Shard

    name = "watched"
    serve = Serve("--address", ray_session.get_runtime_context().gcs_address, "--name", name, "--shards", "2",
                  "--storage-path", str(tmp_path), "--max-restarts", "1", "--no-metrics")
    try:
        serve.wait_for(f"serving 2 shards of cluster {name!r}")
        cluster = connect(name=name)
        table = TableConfig(name="w", num_rows=1000, width=4)
        ids = np.arange(0, 1000, 7)
        with cluster.client() as client:
            client.create_table(table)
            client.push({"w": (ids, np.ones((len(ids), 4), np.float32))}, step=1)
            pid = ray.get(cluster.actors[0].pid.remote())
            os.kill(pid, signal.SIGKILL)  # Ray restarts it once (max_restarts 1)
            serve.wait_for("shard cold 0 restarted: pid")  # the watch saw the new process
            assert serve.proc.poll() is None, serve.output  # a restart is not fatal
            client.push({"w": (ids, np.ones((len(ids), 4), np.float32))}, step=2)
            rows = client.fetch({"w": ids}, min_step=2)["w"].numpy()
            os.kill(ray.get(cluster.actors[0].pid.remote()), signal.SIGKILL)  # restarts used up
        assert serve.proc.wait(timeout=120) == 1, serve.output
    finally:
        if serve.proc.poll() is None:
            serve.proc.send_signal(signal.SIGTERM)
            serve.proc.wait(timeout=60)
    out = serve.output
    print(out)
    assert f"shard cold 0 restarted: pid {pid} -> " in out and "write-ahead log records replayed" in out
    assert "shard cold 0 died for good" in out and "stopped the other shards" in out
    with pytest.raises(ClusterNotFound):
        find_registry(name)
    with pytest.raises(ValueError):
        ray.get_actor(shard_name(name, "cold", 1), namespace=NAMESPACE)
    # cold shard 1 stopped cleanly: it flushed (nothing left in its log to replay) and holds its rows
    survivor = Shard(1, 2, StorageConfig(path=str(tmp_path / "shard-0001")))
    try:
        assert survivor.journal.replayed == 0
        state = survivor.table_state("w")
        mine = ids % 2 == 1
        np.testing.assert_array_equal(state["ids"], ids[mine])
        np.testing.assert_array_equal(state["rows"], rows[mine])
    finally:
        survivor.close()
