"""The user's path, end to end: from the cpu-small overlay, derive what each pod would run (the
`ray start` commands KubeRay builds from rayStartParams for the head and each worker replica, the
head's `engram serve --config` sidecar with the rendered ConfigMap, and the RayJob's entrypoint),
run them as separate processes on this machine, and check the system they make: durable cold shards
and a hot shard that outlive their launcher, training with periodic checkpoints through them, a
shard pod killed mid-training without a lost or doubled update, `engram stats` and `engram stop`.

The processes share a private network namespace that has only a loopback interface (as the pods
of a cluster share a network, though each pod has its own namespace there): nothing they open is
reachable from outside, every address is 127.0.0.1, and the manifests' fixed ports (6379, 50051,
9464, ...) are free whatever else runs on the host. What differs between pods and processes in one
namespace is replaced, each replacement asserted to apply (a change to the manifests' form fails
here rather than slipping through):
- the head's service name becomes 127.0.0.1 (port kept);
- the two ports every Ray node opens at a fixed default (the dashboard agent's and the metrics
  export's) get a distinct value per worker pod: in a cluster each pod has them to itself;
- volume mount paths (/checkpoints, the tables volume, the ConfigMap's) become temporary
  directories, the same for every pod, as the shared volumes are;
- token auth, which KubeRay wires up from a Secret, is off (RAY_AUTH_MODE=disabled).
A killed pod is its processes killed with SIGKILL at once; KubeRay's replacement pod is the same
`ray start` command run again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from deploy import manifests
from tests.deploy.netns import Network, Processes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_deployment_at_a_time")]
OVERLAY = manifests.DEPLOY / "overlays" / "cpu-small"
BIN = Path(sys.executable).parent  # the image's PATH: ray and engram live here
HEAD = f"127.0.0.1:{manifests.HEAD_PORT}"

# Run inside the namespace: the named tables' rows, optimizer state and last step, whichever shard
# homes each row (migration stopped first so rows hold still), as one sha256 per table.
TABLES_SCRIPT = """
import hashlib, json, sys
import numpy as np
import ray
from memory_service.cluster import connect
cluster = connect(sys.argv[1], name=sys.argv[2])
for actor in cluster.hot_actors:
    ray.get(actor.stop_migration.remote())
actors = [*cluster.actors, *cluster.hot_actors]
out = {}
for name in sys.argv[3:]:
    states = [ray.get(a.table_state.remote(name)) for a in actors]
    ids = np.concatenate([s["ids"] for s in states])
    assert len(np.unique(ids)) == len(ids), name + ": a row has two homes"
    order = np.argsort(ids)
    digest = hashlib.sha256()
    for field in ("ids", "rows", "state", "last"):
        digest.update(np.ascontiguousarray(np.concatenate([s[field] for s in states])[order]).tobytes())
    out[name] = [int(len(ids)), digest.hexdigest()]
print(json.dumps(out))
"""


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} not in {text!r}: the manifests changed form"
    return text.replace(old, new)


class Local:
    """Maps one pod's commands onto processes in the shared namespace (see the module docstring)."""

    def __init__(self, tmp: Path, serve: manifests.ServeConfig):
        self.mounts = {"/checkpoints": tmp / "checkpoints", serve.config["storage"]["path"]: tmp / "tables",
                       serve.mount_path: tmp / "config"}
        for path in self.mounts.values():
            path.mkdir()
        local_file = self.mounts[serve.mount_path] / Path(serve.path).relative_to(serve.mount_path)
        local_file.write_text(self.paths(serve.text, serve.config["storage"]["path"], "/checkpoints"))

    def ray_start(self, command: str, node_type: str, index: int) -> str:
        if node_type == "head":
            return command
        command = replace(command, "--dashboard-agent-listen-port=52365",
                          f"--dashboard-agent-listen-port={52366 + index}")
        command = replace(command, "--metrics-export-port=8080", f"--metrics-export-port={8081 + index}")
        return replace(command, "engram-head-svc.default.svc.cluster.local:", "127.0.0.1:")

    def paths(self, command: str, *mounts: str) -> str:
        """`command` with the paths of `mounts` (each must occur) in their local folders."""
        for path in mounts:
            command = replace(command, path, str(self.mounts[path]))
        return command


def engram(procs: Processes, *argv: str, timeout: float = 120, **env):
    return procs.run(["engram", *argv], timeout=timeout, **env)


def table_digests(procs: Processes, name: str, tables: list[str]) -> dict[str, list]:
    out = procs.run(["python", "-c", TABLES_SCRIPT, HEAD, name, *tables])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def shard_actor_pids(procs: Processes) -> dict[str, int]:
    """{actor name: pid} of the live shard actors."""
    script = (
        "import json, ray\n"
        f"ray.init(address='{HEAD}', log_to_driver=False)\n"
        "from ray.util.state import list_actors\n"
        "actors = list_actors(filters=[('class_name', '=', 'ShardActor'), ('state', '=', 'ALIVE')])\n"
        "print(json.dumps({a.name: a.pid for a in actors}))\n")
    out = procs.run(["python", "-c", script])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_deployment_runs_outlives_its_launcher_survives_a_pod_kill_and_stops(tmp_path_factory):
    docs = manifests.render(OVERLAY)
    pods = manifests.pods(docs)
    serve = manifests.serve_config(docs)
    config = serve.config
    name = config["name"]
    (job,) = manifests.by_kind(docs, "RayJob")
    tmp = Path(os.path.realpath("/tmp")) / f"egd{os.getpid()}"  # short: Ray's socket paths
    tmp.mkdir()
    local = Local(tmp_path_factory.mktemp("pods"), serve)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}:{env['PATH']}", PYTHONPATH=str(manifests.ROOT), RAY_TMPDIR=str(tmp),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0",
               OMP_NUM_THREADS="1", RAY_raylet_start_wait_time_s="120")  # nodes start slowly on 2 cores
    network = Network()
    procs = Processes(network, tmp_path_factory.mktemp("logs"), env)
    try:
        # 1. the Ray containers: head first, then every worker replica
        head, workers = pods[0], pods[1:]
        assert head.node_type == "head" and len(workers) == 3
        procs.start("head", ["bash", "-c", local.ray_start(head.ray_start, "head", 0)])
        health = ["ray", "health-check", "--address", HEAD]
        wait_for(lambda: procs.run(health).returncode == 0, "the head's GCS", procs)
        wait_for(lambda: "Ray runtime started" in procs.log("head"), "the head", procs)
        starts = {}
        for i, pod in enumerate(workers):  # one at a time: this test shares two cores
            starts[pod.name] = local.ray_start(pod.ray_start, "worker", i)
            procs.start(pod.name, ["bash", "-c", starts[pod.name]])
            wait_for(lambda: "Ray runtime started" in procs.log(pod.name), pod.name, procs)

        # 2. the head's sidecar, from the rendered ConfigMap: durable cold shards and a hot shard
        (sidecar,) = head.sidecars()
        sidecar_env = {e["name"]: e["value"] for e in sidecar.get("env", []) if "value" in e}
        script = local.paths(" ".join(sidecar["args"]), serve.mount_path)
        procs.start("engram-serve", sidecar["command"] + [script], {**sidecar_env, "RAY_AUTH_MODE": "disabled"})
        serving = f"serving {config['num_shards']} shards and {config['num_hot']} hot shards of cluster"
        wait_for(lambda: serving in procs.log("engram-serve"), "the shards", procs)
        launcher = procs.get("engram-serve")
        launcher.send_signal(signal.SIGTERM)  # Kubernetes stopping the sidecar: detached shards stay
        assert launcher.wait(timeout=60) == 0, procs.log("engram-serve")
        assert f"detached: cluster '{name}' keeps serving" in procs.log("engram-serve")
        procs.start("engram-serve-restarted", sidecar["command"] + [script],  # the kubelet restarts it
                    {**sidecar_env, "RAY_AUTH_MODE": "disabled"})
        wait_for(lambda: "(already running: attached)" in procs.log("engram-serve-restarted"), "the reattach", procs)
        procs.get("engram-serve-restarted").send_signal(signal.SIGTERM)
        assert procs.get("engram-serve-restarted").wait(timeout=60) == 0, procs.log("engram-serve-restarted")
        stats = json.loads(engram(procs, "stats", "--address", HEAD, "--name", name, "--json").stdout)
        roles = sorted(s["role"] for s in stats["shards"])
        assert roles == ["cold"] * config["num_shards"] + ["hot"] * config["num_hot"] == ["cold", "cold", "hot"]
        assert sorted(os.listdir(local.mounts[config["storage"]["path"]])) == ["hot-0000", "shard-0000", "shard-0001"]

        # 3. an uninterrupted reference run, then the RayJob's entrypoint (as Ray runs a job's driver:
        # on the head, RAY_ADDRESS set) with a cold shard's pod killed mid-training
        entrypoint = local.paths(job["spec"]["entrypoint"], "/checkpoints")
        steps, every = (int(re.search(rf"--{flag} (\d+)", entrypoint)[1]) for flag in ("steps", "checkpoint-every"))
        reference = replace(entrypoint, "engram-train", "reference") + " --prefix reference"
        run = procs.run(["bash", "-c", reference], timeout=900, RAY_ADDRESS=HEAD)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        procs.start("job", ["bash", "-c", entrypoint], {"RAY_ADDRESS": HEAD})
        first = local.mounts["/checkpoints"] / "engram-train" / f"step-{every:08d}" / "manifest.json"
        wait_for(lambda: first.exists() or procs.get("job").poll() is not None, "the job's first checkpoint", procs,
                 timeout=600)
        victim = procs.owner_of(shard_actor_pids(procs)[f"engram_shard:{name}:1"])
        assert victim.startswith("shards-"), victim
        procs.kill(victim)
        assert procs.get("job").poll() is None, "the job ended before the kill: nothing was tested"
        procs.start(f"{victim}-replaced", ["bash", "-c", starts[victim]])  # KubeRay's new pod
        job_rc = wait_for(lambda: procs.get("job").poll() is not None and (procs.get("job").returncode,),
                          "the job", procs, timeout=900)
        assert job_rc == (0,), procs.log("job")[-4000:]
        saved = sorted(p.name for p in (local.mounts["/checkpoints"] / "engram-train").glob("step-*"))
        assert saved == [f"step-{s:08d}" for s in range(every, steps + 1, every)]

        # 4. the killed shard came back on the new pod from its files, and nothing was lost or doubled
        pids = shard_actor_pids(procs)
        assert procs.owner_of(pids[f"engram_shard:{name}:1"]) == f"{victim}-replaced"
        stats = json.loads(engram(procs, "stats", "--address", HEAD, "--name", name, "--json").stdout)
        replayed = {(s["role"], s["shard_id"]): s["wal_replayed"] for s in stats["shards"]}
        assert replayed[("cold", 1)] > 0 and replayed[("cold", 0)] == 0, replayed
        tables = table_digests(procs, name, [t["name"] for t in stats["tables"]])
        ours = {t.removeprefix("engram/"): v for t, v in tables.items() if t.startswith("engram/")}
        theirs = {t.removeprefix("reference/"): v for t, v in tables.items() if t.startswith("reference/")}
        assert ours and ours == theirs
        print(f"killed {victim} after checkpoint step {every}; cold shard 1 replayed {replayed[('cold', 1)]} log "
              f"records on {victim}-replaced; {len(ours)} tables, {sum(n for n, _ in ours.values())} rows, equal "
              f"to the uninterrupted run's")

        # 5. engram stats as an operator reads it under `kubectl exec` (no terminal: 80 columns)
        shown = engram(procs, "stats", "--address", HEAD, "--name", name, COLUMNS="80")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert max(map(len, lines)) <= 80 and "…" not in shown.stdout, shown.stdout
        assert any("hot 0" in line for line in lines) and any("cold 1" in line for line in lines), shown.stdout
        print(shown.stdout)

        # 6. engram stop removes them
        stopped = engram(procs, "stop", "--address", HEAD, "--name", name)
        assert stopped.returncode == 0, stopped.stderr
        assert shard_actor_pids(procs) == {}
        gone = engram(procs, "stats", "--address", HEAD, "--name", name, "--timeout", "10")
        assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    finally:
        procs.stop()
        network.close()
        shutil.rmtree(tmp, ignore_errors=True)
