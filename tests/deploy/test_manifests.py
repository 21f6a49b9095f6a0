"""deploy/: every overlay rendered and validated offline (core kinds and the pods KubeRay would make
with kubernetes-validate --strict, CRD kinds against their openAPIV3Schema), our own lint, the
tables cluster's config read by the real loader and the sidecar's and RayJob's commands by the real
CLI parser, the Grafana dashboard against the metrics shards export, and checks that the
validation and the lint do catch what they are for."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import manifests

OVERLAYS = sorted(p for p in (manifests.DEPLOY / "overlays").iterdir() if p.is_dir())
KINDS = {"RayCluster", "RayJob", "PodMonitor", "Service", "PersistentVolumeClaim",
         "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"}
DASHBOARD = manifests.DEPLOY / "grafana" / "engram.json"


@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda p: p.name)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param.name, manifests.render(request.param)


def kubernetes_validate(docs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "docs.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                           "-k", manifests.KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True)


def kuberay_pods(docs: list[dict]) -> list[dict]:
    """The Pod objects KubeRay creates from each group template (one per group), plus the RayJob
    submitter: validated as core v1 Pods."""
    out = [{"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"engram-{g.name}", "labels": g.labels}, "spec": g.pod_spec}
           for g in manifests.groups(docs)]
    for job in manifests.by_kind(docs, "RayJob"):
        out.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "submitter"},
                    "spec": job["spec"]["submitterPodTemplate"]["spec"]})
    return out


def test_overlay_renders_every_kind(overlay):
    name, docs = overlay
    assert {d["kind"] for d in docs} == KINDS
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)


def test_core_kinds_and_pods_validate_strictly(overlay, tmp_path):
    _, docs = overlay
    core = [d for d in docs if not manifests.is_custom(d)] + kuberay_pods(docs)
    result = kubernetes_validate(core, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_custom_kinds_validate_against_their_crds(overlay):
    _, docs = overlay
    assert [d["kind"] for d in docs if manifests.is_custom(d)] == ["RayCluster", "PodMonitor", "RayJob"]
    assert manifests.schema_errors(docs) == []


def test_lint_is_clean(overlay):
    _, docs = overlay
    assert manifests.lint(docs) == []


def test_ray_start_flags_are_real_ray_start_options(overlay):
    """Every flag KubeRay would pass exists in this Ray's `ray start` (a misspelt rayStartParams
    key would make the pod crash-loop)."""
    from ray.scripts.scripts import start

    _, docs = overlay
    for pod in manifests.pods(docs):
        argv = shlex.split(pod.ray_start.split("ray start", 1)[1])
        ctx = start.make_context("ray start", argv)
        assert ctx.params["block"] is True
        assert ctx.params["head"] is (pod.node_type == "head")


def test_pinned_validator_ships_its_schemas_offline():
    pinned = re.search(r'"kubernetes-validate==([0-9.]+)"', (manifests.ROOT / "pyproject.toml").read_text())[1]
    assert importlib.metadata.version("kubernetes-validate") == pinned
    import kubernetes_validate.utils as kv

    assert manifests.KUBERNETES_VERSION in kv.all_versions()


def test_schema_validation_catches_what_it_is_for(tmp_path):
    docs = manifests.render(OVERLAYS[0])
    cluster = manifests.by_kind(docs, "RayCluster")[0]
    cluster["spec"]["workerGroupSpecs"][0]["volumeClaimTemplates"] = []  # groups have none
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    manifests.by_kind(docs, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0]["prot"] = "x"
    errors = "\n".join(manifests.schema_errors(docs))
    assert "'volumeClaimTemplates' was unexpected" in errors
    assert "0 is not of type 'string'" in errors and "'prot' was unexpected" in errors
    pdb = manifests.by_kind(docs, "PodDisruptionBudget")[0]
    pdb["spec"]["minAvailible"] = 1
    result = kubernetes_validate([pdb], tmp_path)
    assert result.returncode != 0 and "minAvailible" in result.stdout + result.stderr


def _cluster(docs):
    return manifests.by_kind(docs, "RayCluster")[0]


def _set(path: str, value):
    """A mutation: set the value at a /-separated path of the first document of a kind."""
    kind, *keys = path.split("/")

    def mutate(docs):
        node = manifests.by_kind(docs, kind)[0]
        for key in keys[:-1]:
            node = node[int(key) if key.isdigit() else key]
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return mutate


def _swap_head_containers(docs):
    containers = _cluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.reverse()


def _edit_config(**changes):
    """A mutation of the tables cluster's config file in its ConfigMap (None deletes a key)."""
    def mutate(docs):
        (config_map,) = [d for d in manifests.by_kind(docs, "ConfigMap")
                         if d["metadata"]["name"] == "engram-cluster-config"]
        config = yaml.safe_load(config_map["data"]["cluster.yaml"])
        for key, value in changes.items():
            section, _, field = key.rpartition(".")
            node = config[section] if section else config
            node.pop(field) if value is None else node.__setitem__(field, value)
        config_map["data"]["cluster.yaml"] = yaml.safe_dump(config)
    return mutate


def _remove_tables_mount(docs):
    mounts = _cluster(docs)["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"]
    mounts[:] = [m for m in mounts if m["name"] != "tables"]


def _tables_claim_read_write_once(docs):
    (claim,) = [d for d in manifests.by_kind(docs, "PersistentVolumeClaim") if d["metadata"]["name"] == "engram-tables"]
    claim["spec"]["accessModes"] = ["ReadWriteOnce"]


def _gpu_off_hot_shards(docs):
    hot = next(g for g in _cluster(docs)["spec"]["workerGroupSpecs"] if g["groupName"] == "hot-shards")
    hot["template"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "8"}}


LINT_CASES = {  # name: (overlay, mutation, message)
    "ray container first": ("cpu-small", _swap_head_containers, "containers[0] must be the Ray container"),
    "start params strings": ("cpu-small", _set("RayCluster/spec/workerGroupSpecs/0/rayStartParams/num-cpus", 2),
                             "must be a string"),
    "pdb integer only": ("cpu-small", _set("PodDisruptionBudget/spec/minAvailable", "50%"),
                         "only an integer minAvailable"),
    "pdb above pods": ("cpu-small", _set("PodDisruptionBudget/spec/minAvailable", 9), "selects 1 pods"),
    "service target port": ("cpu-small", _set("Service/spec/ports/0/targetPort", "grcp"), "targetPort 'grcp'"),
    "image without version": ("cpu-small", _set("RayCluster/spec/workerGroupSpecs/1/template/spec/containers/0/image",
                                                "engram-memory:ray2.60.0-py311"), "must be engram-memory:0.1.0-ray2.60.0-py311"),
    "ray version": ("cpu-small", _set("RayCluster/spec/rayVersion", "2.59.0"), "rayVersion '2.59.0' != the image's Ray"),
    "autoscaling": ("cpu-small", _set("RayCluster/spec/workerGroupSpecs/0/maxReplicas", 8), "must be equal"),
    "head cpus": ("cpu-small", _set("RayCluster/spec/headGroupSpec/rayStartParams/num-cpus", "1"), 'num-cpus must be "0"'),
    "custom resource": ("cpu-small", _set("RayCluster/spec/workerGroupSpecs/1/rayStartParams/resources",
                                          "'{\"engram_shard\": 1}'"), "declared by groups"),
    "auth": ("cpu-small", _set("RayCluster/spec/authOptions", {}), "authOptions.mode must be set"),
    "podmonitor port": ("cpu-small", _set("PodMonitor/spec/podMetricsEndpoints/0/port", "metrics"), "port 'metrics'"),
    "rayjob selector": ("cpu-small", _set("RayJob/spec/clusterSelector", {"ray.io/cluster": "other"}), "clusterSelector"),
    "rayjob checkpoints": ("cpu-small", _set("RayJob/spec/entrypoint", "engram train --steps 20"), "checkpoint periodically"),
    "rayjob resume": ("cpu-small", _set("RayJob/spec/entrypoint", "engram train --checkpoint-dir /c/a --checkpoint-every 5"),
                      "must --resume-from its --checkpoint-dir /c/a"),
    "shard count": ("cpu-small", _set("RayCluster/spec/workerGroupSpecs/0/replicas", 3),
                    "2 shards take 'engram_shard' but the pods declare 3 units"),
    "hot shard count": ("cpu-small", _edit_config(num_hot=2), "2 shards take 'engram_hot' but the pods declare 1 units"),
    "config port": ("cpu-small", _edit_config(port=50052), "!= engram-cluster-config/cluster.yaml port 50052"),
    "config host": ("cpu-small", _edit_config(host="127.0.0.1"), "host must be 0.0.0.0"),
    "no restarts": ("cpu-small", _edit_config(max_restarts=0), "max_restarts 0"),
    "no storage": ("cpu-small", _edit_config(**{"storage.path": None}), "storage.path unset"),
    "storage mount": ("cpu-small", _remove_tables_mount, "group shards: no PersistentVolumeClaim mounted at"),
    "storage shared": ("cpu-small", _tables_claim_read_write_once, "not a ReadWriteMany claim"),
    "sidecar config": ("cpu-small", _set("RayCluster/spec/headGroupSpec/template/spec/containers/1/args/0",
                                         "exec engram serve --config /etc/other/cluster.yaml"), "is on no volume"),
    "hot shards need GPUs": ("gpu", _gpu_off_hot_shards, "hot_device cuda but the pods declaring 'engram_hot' have no GPU"),
    "GPUs idle": ("gpu", _edit_config(hot_device="cpu"), "leave the GPUs idle"),
}


@pytest.mark.parametrize("case", sorted(LINT_CASES))
def test_lint_catches(case):
    overlay, mutate, message = LINT_CASES[case]
    docs = copy.deepcopy(manifests.render(manifests.DEPLOY / "overlays" / overlay))
    assert manifests.lint(docs) == []
    mutate(docs)
    problems = manifests.lint(docs)
    assert any(message in p for p in problems), problems


def test_image_is_tagged_with_the_project_version_and_an_allowed_ray():
    dockerfile = (manifests.DEPLOY / "Dockerfile").read_text()
    ray_version = manifests.image_ray_version(dockerfile)
    version = importlib.metadata.version("engram-memory")
    assert manifests.project_version() == version
    assert f"-t {manifests.image_tag(version, ray_version)} ." in dockerfile
    assert "FROM rayproject/ray:${RAY_TAG}" in dockerfile
    docs = manifests.render(OVERLAYS[0])
    older = dockerfile.replace(f"ARG RAY_TAG={ray_version}-py311", "ARG RAY_TAG=2.9.0-py311")
    problems = manifests.lint(docs, dockerfile=older)
    assert f"deploy/Dockerfile: Ray 2.9.0 is outside pyproject's {manifests.ray_requirement()}" in problems
    assert any("rayVersion '2.60.0' != the image's Ray 2.9.0" in p for p in problems)
    assert any(p.startswith("deploy/Dockerfile: builds") for p in manifests.lint(docs, version="0.2.0"))


def test_cluster_config_is_read_by_the_real_loader(overlay, tmp_path):
    """The ConfigMap's cluster.yaml is what `engram serve --config` accepts (the loader is strict:
    an unknown key or a wrong value fails here), and the sidecar's arguments parse."""
    from memory_service.config_file import load_cluster_config
    from trainer.cli import build_parser

    _, docs = overlay
    serve = manifests.serve_config(docs)
    (tmp_path / "cluster.yaml").write_text(serve.text)
    config = load_cluster_config(tmp_path / "cluster.yaml", environ={})
    assert config.name == manifests.by_kind(docs, "RayCluster")[0]["metadata"]["name"]
    assert config.storage.path == "/var/lib/engram/tables" and config.max_restarts == -1 and config.detached
    args = build_parser().parse_args(["serve", *serve.argv])
    assert args.config == serve.path == "/etc/engram/cluster.yaml" and serve.mount_path == "/etc/engram"


def test_rayjob_resumes_only_from_a_complete_checkpoint(overlay, tmp_path):
    """The entrypoint's shell adds --resume-from once its --checkpoint-dir holds a complete
    checkpoint (manifest.json written last), so the first run starts fresh and a rerun resumes."""
    from trainer.cli import build_parser

    _, docs = overlay
    (job,) = manifests.by_kind(docs, "RayJob")
    command = job["spec"]["entrypoint"].replace("/checkpoints", str(tmp_path))
    assert command.startswith("engram train ")

    def argv() -> list[str]:
        out = subprocess.run(["sh", "-c", "printf '%s\\n' " + command[len("engram "):]],
                             capture_output=True, text=True, check=True)
        return out.stdout.split()

    assert "--resume-from" not in argv()
    (tmp_path / "engram-train" / "step-00000005").mkdir(parents=True)
    assert "--resume-from" not in argv()  # an unfinished save
    (tmp_path / "engram-train" / "step-00000005" / "manifest.json").write_text("{}")
    args = build_parser().parse_args(argv())
    assert args.resume_from == args.checkpoint_dir == str(tmp_path / "engram-train")
    assert args.checkpoint_every > 0


def test_cpu_small_layout():
    """What the end-to-end test runs: a head and 3 workers, 2 cold shard pods with the tables volume,
    1 pod for the hot shard (on CPU) and the trainer."""
    docs = manifests.render(manifests.DEPLOY / "overlays" / "cpu-small")
    pods = manifests.pods(docs)
    assert [p.node_type for p in pods] == ["head", "worker", "worker", "worker"]
    offered = [(p.group, sorted(json.loads(re.search(r"--resources='(.*?)'", p.ray_start)[1])))
               for p in pods[1:]]
    assert offered == [("shards", ["engram_shard"])] * 2 + [("trainers", ["engram_hot", "engram_trainer"])]
    config = manifests.serve_config(docs).config
    assert (config["num_shards"], config["num_hot"], config["hot_device"]) == (2, 1, "cpu")
    assert all(any(v["name"] == "tables" for v in p.volumes) for p in pods[1:3])


def test_gpu_overlay_runs_hot_shards_on_gpus_and_trains_with_cuda():
    docs = manifests.render(manifests.DEPLOY / "overlays" / "gpu")
    config = manifests.serve_config(docs).config
    assert config["hot_device"] == "cuda" and config["num_hot"] > 0
    hot = [p for p in manifests.pods(docs) if "engram_hot" in p.ray_start]
    assert len(hot) == config["num_hot"] and all("--num-gpus=1" in p.ray_start for p in hot)
    entrypoint = manifests.by_kind(docs, "RayJob")[0]["spec"]["entrypoint"]
    assert "--device cuda --gpu" in entrypoint


def _dashboard_metrics(exprs: list[str]) -> set[str]:
    return {re.sub(r"_(total|bucket)$", "", name) for e in exprs for name in re.findall(r"\bengram_[a-z_]+", e)}


def test_dashboard_queries_name_exported_metrics(overlay):
    from memory_service.ops.metrics import METRICS

    _, docs = overlay
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exported = {name for name, *_ in METRICS}
    assert _dashboard_metrics(exprs) <= exported
    assert {"engram_rpc_rows", "engram_rpc_duration_seconds", "engram_table_tier_hits",
            "engram_table_colliding_lookups"} <= _dashboard_metrics(exprs)
    (config_map,) = [d for d in manifests.by_kind(docs, "ConfigMap")
                     if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert json.loads(config_map["data"]["engram.json"]) == dashboard


def test_readme_queries_name_exported_metrics():
    from memory_service.ops.metrics import METRICS

    queries = [line for line in (manifests.DEPLOY / "README.md").read_text().splitlines() if "rate(" in line]
    assert len(queries) >= 4 and _dashboard_metrics(queries) <= {name for name, *_ in METRICS}


def test_config_map_generator_replaces_and_refuses_hashes(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("x: 1\n")
    (tmp_path / "base" / "kustomization.yaml").write_text(
        "generatorOptions: {disableNameSuffixHash: true}\nconfigMapGenerator: [{name: c, files: [a.yaml]}]\n")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "a.yaml").write_text("x: 2\n")
    (tmp_path / "top" / "kustomization.yaml").write_text(
        "resources: [../base]\ngeneratorOptions: {disableNameSuffixHash: true}\n"
        "configMapGenerator: [{name: c, behavior: replace, files: [a.yaml]}]\n")
    (config_map,) = manifests.render(tmp_path / "top")
    assert config_map["data"] == {"a.yaml": "x: 2\n"}
    (tmp_path / "base" / "kustomization.yaml").write_text("configMapGenerator: [{name: c, files: [a.yaml]}]\n")
    with pytest.raises(ValueError, match="disableNameSuffixHash"):
        manifests.render(tmp_path / "base")


def test_render_rejects_unsupported_kustomize_fields(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        manifests.render(tmp_path)
