"""deploy/: every overlay rendered and validated offline (core kinds and the pods KubeRay would make
with kubernetes-validate --strict, CRD kinds against their openAPIV3Schema), our own lint, and
checks that the validation and the lint do catch what they are for."""
from __future__ import annotations

import copy
import importlib.metadata
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
         "PodDisruptionBudget", "NetworkPolicy"}


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


LINT_CASES = {
    "ray container first": (_swap_head_containers, "containers[0] must be the Ray container"),
    "start params strings": (_set("RayCluster/spec/workerGroupSpecs/0/rayStartParams/num-cpus", 2),
                             "must be a string"),
    "pdb integer only": (_set("PodDisruptionBudget/spec/minAvailable", "50%"), "only an integer minAvailable"),
    "pdb above pods": (_set("PodDisruptionBudget/spec/minAvailable", 9), "selects 1 pods"),
    "service target port": (_set("Service/spec/ports/0/targetPort", "grcp"), "targetPort 'grcp'"),
    "image tag": (_set("RayCluster/spec/workerGroupSpecs/1/template/spec/containers/0/image",
                       "engram-memory:ray2.9.0-py311"), "must be engram-memory:ray"),
    "ray version": (_set("RayCluster/spec/rayVersion", "2.9.0"), "rayVersion '2.9.0' != pinned"),
    "autoscaling": (_set("RayCluster/spec/workerGroupSpecs/0/maxReplicas", 8), "must be equal"),
    "head cpus": (_set("RayCluster/spec/headGroupSpec/rayStartParams/num-cpus", "1"), 'num-cpus must be "0"'),
    "custom resource": (_set("RayCluster/spec/workerGroupSpecs/1/rayStartParams/resources",
                             "'{\"engram_shard\": 1}'"), "declared by groups"),
    "auth": (_set("RayCluster/spec/authOptions", {}), "authOptions.mode must be set"),
    "podmonitor port": (_set("PodMonitor/spec/podMetricsEndpoints/0/port", "metrics"), "port 'metrics'"),
    "rayjob selector": (_set("RayJob/spec/clusterSelector", {"ray.io/cluster": "other"}), "clusterSelector"),
    "serve shards": (_set("RayCluster/spec/workerGroupSpecs/0/replicas", 3), "--shards 2 but 3 pods"),
}


@pytest.mark.parametrize("case", sorted(LINT_CASES))
def test_lint_catches(case):
    mutate, message = LINT_CASES[case]
    docs = copy.deepcopy(manifests.render(manifests.DEPLOY / "overlays" / "cpu-small"))
    mutate(docs)
    problems = manifests.lint(docs)
    assert any(message in p for p in problems), problems


def test_dockerfile_tag_is_the_pinned_ray():
    ray_version = manifests.pinned_ray_version()
    assert ray_version == importlib.metadata.version("ray")
    docs = manifests.render(OVERLAYS[0])
    assert manifests.lint(docs, dockerfile="ARG RAY_TAG=2.9.0-py311\n") == [
        f"deploy/Dockerfile: ARG RAY_TAG must default to {ray_version}-py311"]
    assert "FROM rayproject/ray:${RAY_TAG}" in (manifests.DEPLOY / "Dockerfile").read_text()


def test_render_rejects_unsupported_kustomize_fields(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        manifests.render(tmp_path)
