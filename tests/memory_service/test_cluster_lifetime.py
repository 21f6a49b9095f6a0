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
from dataclasses import replace

import numpy as np
import pytest
import ray

from memory_service.cluster import ClusterConfig, connect, find_registry, launch, stop_cluster
from memory_service.cluster_resources import check_resources
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
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


def wait_restarted(actor, old_pid: int, timeout: float = 120) -> None:
    """Until `actor` answers from a process other than `old_pid` (Ray restarted it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.pid.remote(), timeout=5) != old_pid:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"actor not restarted within {timeout:g} s")


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
        rows = client.fetch({"kept": np.arange(8)})["kept"].numpy()
    # a detached cold shard is still restarted after a crash, on its port, with its rows
    pid = ray.get(cluster.actors[0].pid.remote())
    ray.kill(cluster.actors[0], no_restart=False)
    wait_restarted(cluster.actors[0], pid)
    assert ray.get(cluster.actors[0].get_address.remote()).target == targets[0]
    with cluster.client() as client:
        np.testing.assert_array_equal(client.fetch({"kept": np.arange(8)})["kept"].numpy(), rows)
    cluster.shutdown()  # detaches only
    assert stop_cluster("detached") == 3
    with pytest.raises(ClusterNotFound, match="no tables cluster 'detached'"):
        find_registry("detached")
    for role, shard_id in (("cold", 0), ("cold", 1), ("hot", 0)):
        with pytest.raises(ValueError):
            ray.get_actor(shard_name("detached", role, shard_id), namespace=NAMESPACE)
    # the shards flushed on stop: their files hold the rows, and no write-ahead log is left to replay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hot-0000", "shard-0000", "shard-0001"]


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


def test_join_timeout_waits_for_nodes_to_join_before_failing(ray_session):
    """A Kubernetes sidecar may start before the shard pods join: with join_timeout_s the check
    waits that long for the resource (here it never comes) instead of failing at once."""
    config = ClusterConfig(num_shards=1, name="joining", shard_resource="engram_late", join_timeout_s=1.5)
    start = time.monotonic()
    with pytest.raises(ClusterError, match="no Ray node offers resource 'engram_late'"):
        check_resources(config, wait_s=0)
    assert time.monotonic() - start >= 1.5
    start = time.monotonic()
    with pytest.raises(ClusterError):
        check_resources(replace(config, join_timeout_s=0.0), wait_s=0)
    assert time.monotonic() - start < 1.5  # without it: at once


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
    wait_restarted(cluster.actors[1], old_pid)
    assert ray.get(cluster.actors[1].get_address.remote()).target == cluster.targets[1]
    with cluster.client() as client:
        client.create_table(TableConfig(name="after", num_rows=16, width=4))
        assert client.fetch({"after": np.arange(16)})["after"].shape == (16, 4)


def test_detached_on_the_embedded_cluster_is_refused(ray_session):
    """The embedded Ray ends with the process that started it: detached shards there would not outlive it."""
    with pytest.raises(ClusterError, match="detached shards need a Ray cluster that outlives this process"):
        launch(ClusterConfig(num_shards=1, name="embedded-detached", detached=True))


def merged_state(actors: list, name: str) -> dict[int, tuple]:
    """id -> (row, optimizer state) over the shards `actors`."""
    out = {}
    for actor in actors:
        state = ray.get(actor.table_state.remote(name))
        for i, row_id in enumerate(state["ids"].tolist()):
            assert row_id not in out, f"row {row_id} held by two shards"
            out[row_id] = (state["rows"][i].tolist(), state["state"][i].tolist())
    return out


def test_a_clean_stop_keeps_the_hot_rows(ray_session, tmp_path):
    """stop_cluster moves the hot shard's rows back to the cold shards before they flush: the
    cluster served again from the same files holds every row and optimizer state, hot ones too."""
    config = ClusterConfig(num_shards=2, num_hot=1, hot_rows=64, migrate_interval_s=0.005, migrate_max_duty=1.0,
                           name="drained", storage=StorageConfig(path=str(tmp_path)))
    table = TableConfig(name="d", num_rows=1000, width=4, optimizer=OptimizerConfig(lr=0.1))
    cluster = launch(config)
    ids = np.arange(0, 1000, 25)
    with cluster.client() as client:
        client.create_table(table)
        deadline = time.monotonic() + 60
        step = 0
        while ray.get(cluster.hot_actors[0].migration_counters.remote())["promoted"] == 0:
            assert time.monotonic() < deadline, "no row was promoted"
            step += 1
            client.fetch({"d": ids}, min_step=step - 1)
            client.push({"d": (ids, np.full((len(ids), 4), step, np.float32))}, step=step)
        client.fetch({"d": ids}, min_step=step)  # every push applied before the state is read
    ray.get(cluster.hot_actors[0].stop_migration.remote())  # rows hold still while we read them all
    before = merged_state([*cluster.actors, *cluster.hot_actors], "d")
    assert len(ray.get(cluster.hot_actors[0].table_state.remote("d"))["ids"]) > 0  # some rows are hot
    assert stop_cluster("drained") == 3
    again = launch(config)
    try:
        assert merged_state(again.actors, "d") == before  # all in the cold shards' files
        with again.client() as client:
            client.create_table(table)  # as a trainer does: the new hot shard learns the table
            np.testing.assert_array_equal(client.fetch({"d": ids})["d"].numpy(),
                                          np.array([before[i][0] for i in ids.tolist()], np.float32))
    finally:
        again.shutdown()


def test_the_embedded_cluster_listens_on_loopback_only(make_cluster):
    """Issue 22, finding 1: no server of the embedded Ray cluster (GCS, raylet, object manager,
    agents, workers, this driver's core worker), nor a shard's gRPC server, listens on an address
    another machine can reach; its token auth is off, so one that did would run anyone's code."""
    import ipaddress
    import socket

    import psutil

    cluster = make_cluster(1, num_hot=1)  # shard actors among the workers
    me = psutil.Process()
    listening = []
    for proc in [me, *me.children(recursive=True)]:  # Ray's daemons and workers descend from the driver
        try:
            listening += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address.is_loopback or getattr(address, "ipv4_mapped", None) is not None \
            and address.ipv4_mapped.is_loopback

    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    names = {name for name, _, _ in listening}
    assert any(port == gcs_port for _, _, port in listening) and "raylet" in names, listening
    assert all(loopback(ip) for _, ip, _ in listening), [s for s in listening if not loopback(s[1])]
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert all(a.host == "127.0.0.1" for a in [*cluster.addresses, *cluster.hot_addresses])
    host = socket.gethostbyname(socket.gethostname())
    if not ipaddress.ip_address(host).is_loopback:  # the host's own address: refused
        with pytest.raises(OSError):
            socket.create_connection((host, gcs_port), timeout=5).close()


def test_a_dead_shard_does_not_keep_the_others_from_stopping(ray_session):
    """Issue 22, finding 8: with one shard dead (all-DRAM: not restarted), shutdown still stops
    and removes every other actor, then says which shard did not stop cleanly."""
    cluster = launch(ClusterConfig(num_shards=2, name="one-dead"))
    ray.kill(cluster.actors[0])
    with pytest.raises(ClusterError, match="'one-dead' removed, but not every shard stopped cleanly: cold 0"):
        cluster.shutdown()
    with pytest.raises(ClusterNotFound):
        find_registry("one-dead")
    with pytest.raises(ValueError):
        ray.get_actor(shard_name("one-dead", "cold", 1), namespace=NAMESPACE)
