"""The manifests run: from the cpu-small overlay, derive what each pod would run (the `ray start`
commands KubeRay builds from rayStartParams for the head and each worker replica, the head's
`engram serve` sidecar, and the RayJob's entrypoint), run them as separate processes on this
machine, and read the shards they started, and the training progress the job made, with
`engram stats`.

The processes share a private network namespace that has only a loopback interface (as the pods
of a cluster share a network, though each pod has its own namespace there): nothing they open is
reachable from outside, every address is 127.0.0.1, and the manifests' fixed ports (6379, 50051,
9464, ...) are free whatever else runs on the host. What differs between pods and processes in one
namespace is replaced, each replacement asserted to apply (a change to the manifests' form fails
here rather than slipping through):
- the head's service name becomes 127.0.0.1 (port kept);
- the two ports every Ray node opens at a fixed default (the dashboard agent's and the metrics
  export's) get a distinct value per worker pod: in a cluster each pod has them to itself;
- volume mount paths (/checkpoints) become a temporary directory;
- token auth, which KubeRay wires up from a Secret, is off (RAY_AUTH_MODE=disabled).
Needs util-linux's unshare and nsenter, iproute2's ip, and root or unprivileged user namespaces.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from deploy import manifests
from tests.deploy.netns import Network, Processes, wait_for

pytestmark = pytest.mark.slow
OVERLAY = manifests.DEPLOY / "overlays" / "cpu-small"
BIN = Path(sys.executable).parent  # the image's PATH: ray and engram live here


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} not in {text!r}: the manifests changed form"
    return text.replace(old, new)


class Local:
    """Maps one pod's commands onto processes in the shared namespace (see the module docstring)."""

    def __init__(self, tmp: Path):
        self.mounts = {"/checkpoints": str(tmp / "checkpoints")}
        Path(self.mounts["/checkpoints"]).mkdir()

    def ray_start(self, command: str, node_type: str, index: int) -> str:
        if node_type == "head":
            return command
        command = replace(command, "--dashboard-agent-listen-port=52365",
                          f"--dashboard-agent-listen-port={52366 + index}")
        command = replace(command, "--metrics-export-port=8080", f"--metrics-export-port={8081 + index}")
        return replace(command, "engram-head-svc.default.svc.cluster.local:", "127.0.0.1:")

    def entrypoint(self, command: str) -> str:
        for path, local in self.mounts.items():
            command = replace(command, path, local)
        return command


def engram_stats(procs: Processes, name: str) -> dict:
    out = procs.run(["engram", "stats", "--address", f"127.0.0.1:{manifests.HEAD_PORT}", "--name", name, "--json"])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def shard_nodes(procs: Processes) -> list[dict]:
    """The Ray resources of the node each shard actor runs on."""
    script = (
        "import json, ray\n"
        f"ray.init(address='127.0.0.1:{manifests.HEAD_PORT}', log_to_driver=False)\n"
        "from ray.util.state import list_actors\n"
        "nodes = {n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}\n"
        "actors = list_actors(filters=[('class_name', '=', 'ShardActor'), ('state', '=', 'ALIVE')])\n"
        "print(json.dumps([nodes[a.node_id] for a in actors]))\n")
    out = procs.run(["python", "-c", script])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_manifests_run(tmp_path_factory):
    docs = manifests.render(OVERLAY)
    pods = manifests.pods(docs)
    serve = manifests.serve_args(docs)
    (job,) = manifests.by_kind(docs, "RayJob")
    tmp = Path(os.path.realpath("/tmp")) / f"egd{os.getpid()}"  # short: Ray's socket paths
    tmp.mkdir()
    local = Local(tmp_path_factory.mktemp("pods"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}:{env['PATH']}", PYTHONPATH=str(manifests.ROOT), RAY_TMPDIR=str(tmp),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0",
               OMP_NUM_THREADS="1", RAY_raylet_start_wait_time_s="120")  # nodes start slowly on one core
    network = Network()
    procs = Processes(network, tmp_path_factory.mktemp("logs"), env)
    try:
        # 1. the Ray containers: head first, then every worker replica
        head, workers = pods[0], pods[1:]
        assert head.node_type == "head" and {p.group for p in workers} == {"shards", "trainers"}
        procs.start("head", ["bash", "-c", local.ray_start(head.ray_start, "head", 0)])
        health = ["ray", "health-check", "--address", f"127.0.0.1:{manifests.HEAD_PORT}"]
        wait_for(lambda: procs.run(health).returncode == 0, "the head's GCS", procs)
        wait_for(lambda: "Ray runtime started" in procs.log("head"), "the head", procs)
        for i, pod in enumerate(workers):  # one at a time: this test shares one core
            procs.start(pod.name, ["bash", "-c", local.ray_start(pod.ray_start, "worker", i)])
            wait_for(lambda: "Ray runtime started" in procs.log(pod.name), pod.name, procs)
        # 2. the head's sidecar: the tables' driver starts the shards on the shard pods
        (sidecar,) = head.sidecars()
        sidecar_env = {e["name"]: e["value"] for e in sidecar.get("env", []) if "value" in e}
        procs.start("engram-serve", sidecar["command"] + sidecar["args"],
                    {**sidecar_env, "RAY_AUTH_MODE": "disabled"})
        wait_for(lambda: f"serving {serve.shards} shards" in procs.log("engram-serve"), "the shards", procs)
        stats = engram_stats(procs, serve.name)
        assert stats["num_shards"] == serve.shards == sum(p.group == "shards" for p in workers)
        targets = sorted(line.split(": ")[1] for line in procs.log("engram-serve").splitlines()
                         if line.startswith("shard "))
        # one namespace for both shard pods: the first free ports from --port
        assert targets == [f"127.0.0.1:{serve.port + i}" for i in range(serve.shards)]
        nodes = shard_nodes(procs)
        assert len(nodes) == serve.shards and all(n.get(serve.resource) == 1.0 for n in nodes)
        # 3. the RayJob's entrypoint, run as Ray runs a job's driver: on the head, RAY_ADDRESS set
        entrypoint = local.entrypoint(job["spec"]["entrypoint"])
        run = procs.run(["bash", "-c", entrypoint], timeout=900,
                        RAY_ADDRESS=f"127.0.0.1:{manifests.HEAD_PORT}")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # 4. engram stats reads the training progress
        stats = engram_stats(procs, serve.name)
        steps = int(re.search(r"--steps (\d+)", entrypoint)[1])
        assert stats["tables"] and all(t["step"] == steps and t["rows"] > 0 for t in stats["tables"])
        assert all(s["counters"]["push_requests"] >= steps for s in stats["shards"])
    finally:
        procs.stop()
        network.close()
        shutil.rmtree(tmp, ignore_errors=True)
