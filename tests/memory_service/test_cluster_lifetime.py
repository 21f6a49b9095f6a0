"""How a tables cluster lives on Ray (memory_service/cluster.py): detached shards outlive the
driver that launched them and `stop_cluster` ends them; a driver with $RAY_ADDRESS set attaches
to that Ray cluster; a missing resource or a shard that does not come up fails at once with the fix;
the registry survives its own restart and a cold shard restarted after it gets its old port back.
All on the session's embedded Ray cluster, which subprocesses join by its address."""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import ray

from memory_service.cluster import (ClusterConfig, check_resources, connect, find_registry, launch,
                                    stop_cluster)
from memory_service.config import StorageConfig, TableConfig
from memory_service.errors import ClusterError, ClusterNotFound
from memory_service.server.registry import NAMESPACE, shard_name


def launch_in_subprocess(name: str, storage: str) -> str:
    """A driver that joins this Ray cluster through $RAY_ADDRESS, starts detached shards with
    start_local (which must attach, not start its own Ray), detaches and exits; its output."""
    script = textwrap.dedent(f"""
        import ray
        from memory_service.cluster import start_local
        from memory_service.config import StorageConfig
        cluster = start_local(num_shards=2, num_hot=1, niceness=0, name={name!r}, detached=True,
                              storage=StorageConfig(path={storage!r}))
        print("gcs", ray.get_runtime_context().gcs_address)
        print("targets", ",".join(cluster.targets + cluster.hot_targets))
        cluster.shutdown()  # detached: leaves the shards serving
    """)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_detached_shards_outlive_their_launcher(ray_session, tmp_path):
    out = launch_in_subprocess("detached", str(tmp_path))
    assert f"gcs {ray.get_runtime_context().gcs_address}" in out  # attached: the same Ray cluster
    targets = out.split("targets ")[1].split()[0].split(",")
    cluster = connect(name="detached")  # the launcher has exited
    assert cluster.targets + cluster.hot_targets == targets and not cluster.owns_actors
    cfg = TableConfig(name="kept", num_rows=64, width=4)
    with cluster.client() as client:
        client.create_table(cfg)
        client.push({"kept": (np.arange(8), np.ones((8, 4), np.float32))}, step=1)
        assert client.fetch({"kept": np.arange(8)})["kept"].shape == (8, 4)
    cluster.shutdown()  # detaches only
    assert stop_cluster("detached") == 3
    with pytest.raises(ClusterNotFound, match="no tables cluster 'detached'"):
        find_registry("detached")
    for role, shard_id in (("cold", 0), ("cold", 1), ("hot", 0)):
        with pytest.raises(ValueError):
            ray.get_actor(shard_name("detached", role, shard_id), namespace=NAMESPACE)
    # the cold shards flushed on stop: their files hold the rows, and no write-ahead log is left to replay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0000", "shard-0001"]


def test_unknown_cluster_is_one_line(ray_session):
    with pytest.raises(ClusterNotFound) as err:
        connect(name="nowhere")
    assert "no tables cluster 'nowhere'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ClusterNotFound):
        stop_cluster("nowhere")


@pytest.mark.parametrize("fields, missing", [
    (dict(shard_resource="engram_absent"), "engram_absent"),
    (dict(num_hot=1, hot_resource="engram_hot_absent"), "engram_hot_absent"),
])
def test_missing_resource_fails_fast_with_the_fix(ray_session, fields, missing):
    config = ClusterConfig(num_shards=2, name=f"short-{missing}", **fields)
    start = time.monotonic()
    with pytest.raises(ClusterError) as err:
        launch(config)
    elapsed = time.monotonic() - start
    needed = 2 if missing == "engram_absent" else 1
    assert f"no Ray node offers resource '{missing}'" in str(err.value)
    assert f"""ray start --resources='{{"{missing}": {needed}}}'""" in str(err.value)
    assert elapsed < 10, elapsed
    with pytest.raises(ClusterNotFound):  # nothing was started
        find_registry(config.name)


def test_too_few_units_are_counted(ray_session):
    with pytest.raises(ClusterError, match="the Ray cluster's nodes offer 4096 units of resource 'engram_shard'"):
        check_resources(ClusterConfig(num_shards=4096, num_hot=1, name="too-many"), wait_s=0)


def test_a_shard_late_past_the_deadline_fails_and_leaves_nothing(ray_session):
    config = ClusterConfig(num_shards=1, name="late", ready_timeout_s=0.001)
    with pytest.raises(ClusterError, match=r"cold shards \[0\] of tables cluster 'late' not serving after"):
        launch(config)
    with pytest.raises(ClusterNotFound):
        find_registry("late")


def test_registry_restart_keeps_the_cluster_findable(make_cluster, tmp_path):
    """The registry's process dies: Ray restarts it, it asks the shards where they serve, drivers
    find them again, and a cold shard that crashes afterwards gets its old port back."""
    cluster = make_cluster(2, storage=StorageConfig(path=str(tmp_path)))
    with pytest.raises(ClusterError, match="already runs"):
        launch(ClusterConfig(num_shards=1, name=cluster.config.name))
    with pytest.raises(ClusterError, match="2 of 4096 units of resource 'engram_shard' are taken"):
        check_resources(ClusterConfig(num_shards=4096), wait_s=0)
    def registry_pid() -> int:
        return ray.get(cluster.registry.__ray_call__.remote(lambda self: os.getpid()), timeout=60)

    before = registry_pid()
    ray.kill(cluster.registry, no_restart=False)  # returns before the process is gone
    deadline = time.monotonic() + 60
    while registry_pid() == before:  # until a new process, started with an empty map, answers
        assert time.monotonic() < deadline, "the registry was not restarted"
        time.sleep(0.2)
    again = connect(name=cluster.config.name)
    assert again.targets == cluster.targets
    old_pid = ray.get(cluster.actors[1].pid.remote())
    ray.kill(cluster.actors[1], no_restart=False)  # a crash: Ray restarts it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if ray.get(cluster.actors[1].pid.remote(), timeout=5) != old_pid:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    assert ray.get(cluster.actors[1].get_address.remote()).target == cluster.targets[1]
    with cluster.client() as client:
        client.create_table(TableConfig(name="after", num_rows=16, width=4))
        assert client.fetch({"after": np.arange(16)})["after"].shape == (16, 4)


def test_detached_on_the_embedded_cluster_is_refused(ray_session):
    """The embedded Ray ends with the process that started it: detached shards there would not outlive it."""
    with pytest.raises(ClusterError, match="detached shards need a Ray cluster that outlives this process"):
        launch(ClusterConfig(num_shards=1, name="embedded-detached", detached=True))
