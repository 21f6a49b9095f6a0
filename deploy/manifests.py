"""deploy/ as data: render an overlay, validate it offline, lint what schemas cannot catch, and
derive what each pod would run.

    python deploy/manifests.py deploy/overlays/cpu-small           # the rendered YAML
    python deploy/manifests.py deploy/overlays/cpu-small --check   # CRD schemas + lint

`render` implements the subset of kustomize these manifests use (`resources`, `patches` of JSON
6902 operations with a `target`, and `configMapGenerator` from files without a name-suffix hash)
and rejects any other kustomization field, so it cannot silently disagree with `kubectl kustomize`. CRD kinds are validated against the vendored CRDs'
`openAPIV3Schema` (deploy/crds/, KubeRay v1.7.0 and prometheus-operator v0.93.0), made strict the
way the API server's strict field validation is: an unknown field is an error. Core kinds are for
`kubernetes-validate --strict` (tests/deploy/test_manifests.py runs it). `pods` mirrors how KubeRay v1.7
turns a group into pods: the `ray start` command it generates from `rayStartParams` and the Ray
container's resources, and the containers beside it. `serve_config` reads the tables cluster's
config (the ConfigMap the head's `engram serve --config` sidecar mounts).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import jsonpatch
import jsonschema
import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
CRDS = DEPLOY / "crds"
KUBERNETES_VERSION = "1.33.0"  # what core kinds are validated against (kubernetes-validate -k)
CRD_FILES = {
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "configMapGenerator", "generatorOptions"}
GENERATOR_FIELDS = {"name", "files", "behavior", "options"}
HEAD_PORT = 6379  # KubeRay's default GCS port (rayStartParams has no `port`)
IMAGE = "engram-memory"


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if doc]


# --- rendering ------------------------------------------------------------------------------------

def render(directory: Path) -> list[dict]:
    """The documents of a kustomization directory, ConfigMaps generated and patches applied."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: fields {sorted(unknown)} are not in the "
                         f"supported subset {sorted(KUSTOMIZATION_FIELDS)}")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else load_yaml(path)
    for generator in kustomization.get("configMapGenerator", []):
        _generate_config_map(directory, kustomization, generator, docs)
    for patch in kustomization.get("patches", []):
        targets = [d for d in docs if _is_target(d, patch["target"])]
        if len(targets) != 1:
            raise ValueError(f"{directory}: patch {patch['path']} matches {len(targets)} documents")
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        jsonpatch.apply_patch(targets[0], operations, in_place=True)
    return docs


def _generate_config_map(directory: Path, kustomization: dict, generator: dict, docs: list[dict]) -> None:
    """A configMapGenerator entry: `files` (each `path` or `key=path`) become data keys; behavior
    create (default) adds the ConfigMap, replace swaps a base's data for these, merge adds keys.
    Only without the name-suffix hash, which kustomize computes and this subset does not."""
    where = f"{directory}/kustomization.yaml: configMapGenerator {generator.get('name')!r}"
    unknown = set(generator) - GENERATOR_FIELDS
    if unknown or set(generator.get("options", {})) - {"labels"}:
        raise ValueError(f"{where}: fields {sorted(unknown) or generator['options']} are not in the supported subset")
    if kustomization.get("generatorOptions") != {"disableNameSuffixHash": True}:
        raise ValueError(f"{where}: needs generatorOptions {{disableNameSuffixHash: true}} (the only form supported)")
    data = {}
    for entry in generator["files"]:
        key, _, path = entry.rpartition("=")
        data[key or Path(path).name] = (directory / path).read_text()
    behavior = generator.get("behavior", "create")
    existing = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]]
    if behavior == "create":
        if existing:
            raise ValueError(f"{where}: a ConfigMap of that name exists (use behavior replace or merge)")
        labels = generator.get("options", {}).get("labels", {})
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"], **({"labels": dict(labels)} if labels else {})},
                     "data": data})
    elif behavior in ("replace", "merge") and len(existing) == 1:
        existing[0]["data"] = data if behavior == "replace" else {**existing[0].get("data", {}), **data}
    else:
        raise ValueError(f"{where}: behavior {behavior!r} needs exactly one ConfigMap of that name, found {len(existing)}")


def _is_target(doc: dict, target: dict) -> bool:
    group, version = target.get("group"), target.get("version")
    api_version = f"{group}/{version}" if group else version
    return (doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]
            and (api_version is None or doc["apiVersion"] == api_version))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# --- schemas --------------------------------------------------------------------------------------

def is_custom(doc: dict) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CRD_FILES


@functools.cache  # a CRD is ~1 MB of YAML: read and convert it once per process
def crd_schema(api_version: str, kind: str) -> dict:
    """The strict openAPIV3Schema of a vendored CRD's served version (shared: do not modify)."""
    crd = load_yaml(CRDS / CRD_FILES[(api_version, kind)])[0]
    version = api_version.split("/")[1]
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return strict(schema)


def strict(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever it lists an object's fields and does not
    say to keep unknown ones (the API server prunes or, strictly, rejects them)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if isinstance(v, dict) else [strict(x) for x in v] if isinstance(v, list) else v
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if ("additionalProperties" not in out
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
    return out


def schema_errors(docs: list[dict]) -> list[str]:
    """Every CRD document checked against its strict schema: 'Kind/name: path: message'."""
    errors = []
    for doc in filter(is_custom, docs):
        validator = jsonschema.Draft7Validator(crd_schema(doc["apiVersion"], doc["kind"]))
        for err in validator.iter_errors(doc):
            path = "/".join(map(str, err.absolute_path))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {err.message}")
    return errors


# --- pods: what KubeRay runs ----------------------------------------------------------------------

@dataclass
class Pod:
    """One pod a RayCluster group makes: its labels, containers and the Ray start command."""

    name: str  # "<group>-<i>" ("head" for the head)
    group: str  # the group name ("headgroup" for the head, as KubeRay labels it)
    node_type: str  # "head" or "worker"
    labels: dict[str, str]
    ray_start: str  # the command KubeRay runs in the Ray container (containers[0])
    containers: list[dict]  # the template's containers, the Ray container first
    volumes: list[dict] = field(default_factory=list)

    def sidecars(self) -> list[dict]:
        return self.containers[1:]


def parse_quantity(text) -> Decimal:
    """A Kubernetes quantity ("500m", "2", "8Gi", "1e3") as a number."""
    suffixes = {"m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
                "T": Decimal(10**12), "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
                "Ti": Decimal(2**40)}
    m = re.fullmatch(r"([0-9.eE+-]+?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text))
    if not m:
        raise ValueError(f"quantity {text!r} is not a Kubernetes quantity")
    return Decimal(m[1]) * suffixes.get(m[2] or "", Decimal(1))


def _int_value(quantity) -> int:
    """resource.Quantity.Value(): the quantity rounded up to an integer."""
    return math.ceil(parse_quantity(quantity))


def head_address(cluster: dict, namespace: str = "default") -> str:
    """host:port of the head service KubeRay creates (workers join there)."""
    return f"{cluster['metadata']['name']}-head-svc.{namespace}.svc.cluster.local:{HEAD_PORT}"


def ray_start_command(node_type: str, params: dict[str, str], resources: dict, address: str) -> str:
    """What KubeRay v1.7 runs in the Ray container: setMissingRayStartParams, then
    generateRayStartCommand (num-cpus, memory and GPUs from the limits), flags in sorted order."""
    params = dict(params)
    if node_type == "worker":
        params.setdefault("address", address)
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu is not None and parse_quantity(cpu) != 0:
            params["num-cpus"] = str(_int_value(cpu))
    if "memory" not in params and limits.get("memory") is not None:
        params["memory"] = str(_int_value(limits["memory"]))
    for key in sorted(limits):
        if "num-gpus" not in params and key.endswith("gpu") and parse_quantity(limits[key]) != 0:
            params["num-gpus"] = str(_int_value(limits[key]))
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard"):
            flags += f" --{key} " if value.lower() == "true" else ""
        else:
            flags += f" --{key}={value} "
    head = "--head " if node_type == "head" else ""
    return f"ulimit -n 65536; ray start {head}{flags}"


@dataclass
class Group:
    """A RayCluster group: its name (KubeRay labels the head's "headgroup"), node type, replica
    count, the labels its pods get (the template's plus KubeRay's), and its spec."""

    name: str
    node_type: str
    replicas: int
    labels: dict[str, str]
    spec: dict  # the group spec: rayStartParams, template, ...

    @property
    def pod_spec(self) -> dict:
        return self.spec["template"]["spec"]


def groups(docs: list[dict]) -> list[Group]:
    """The head group, then the worker groups, of the (single) RayCluster."""
    (cluster,) = by_kind(docs, "RayCluster")
    specs = [("headgroup", "head", 1, cluster["spec"]["headGroupSpec"])]
    specs += [(g["groupName"], "worker", g.get("replicas", 0), g) for g in cluster["spec"]["workerGroupSpecs"]]
    return [Group(name, node_type, replicas,
                  {**spec["template"].get("metadata", {}).get("labels", {}),
                   "ray.io/cluster": cluster["metadata"]["name"], "ray.io/group": name,
                   "ray.io/node-type": node_type}, spec)
            for name, node_type, replicas, spec in specs]


def pods(docs: list[dict]) -> list[Pod]:
    """Every pod of the RayCluster: the head, then each group's replicas."""
    address = head_address(by_kind(docs, "RayCluster")[0])
    out = []
    for g in groups(docs):
        containers = g.pod_spec["containers"]
        command = ray_start_command(g.node_type, g.spec.get("rayStartParams", {}),
                                    containers[0].get("resources", {}), address)
        out += [Pod(name="head" if g.node_type == "head" else f"{g.name}-{i}", group=g.name,
                    node_type=g.node_type, labels=g.labels, ray_start=command, containers=containers,
                    volumes=g.pod_spec.get("volumes", []))
                for i in range(g.replicas)]
    return out


def custom_resources(params: dict[str, str]) -> dict[str, float]:
    """rayStartParams["resources"] parsed as KubeRay does: quotes trimmed, then JSON."""
    text = params.get("resources")
    return json.loads(text.strip("'\"` ")) if text else {}


@dataclass
class ServeConfig:
    """What the head's `engram serve` sidecar runs with: its arguments, the config file it reads
    (`path`, inside the volume mounted at `mount_path`), and that file's text and contents, as
    rendered from the ConfigMap `config_map` (key `key`)."""

    argv: list[str]  # after `engram serve`
    path: str  # --config's value, e.g. /etc/engram/cluster.yaml
    mount_path: str  # where the sidecar mounts the ConfigMap's volume
    config_map: str
    key: str
    text: str
    config: dict  # the file parsed (keys = ClusterConfig's fields)


def serve_config(docs: list[dict]) -> ServeConfig | None:
    """The head sidecar's `engram serve --config FILE` and the rendered ConfigMap that FILE is;
    None when no container of the head runs `engram serve`."""
    (cluster,) = by_kind(docs, "RayCluster")
    pod_spec = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    for container in pod_spec["containers"][1:]:
        script = " ".join(container.get("command", []) + container.get("args", []))
        if m := re.search(r"engram serve ([^;&|]*)", script):
            argv = shlex.split(m[1])
            return _config_of(docs, pod_spec, container, argv)
    return None


def _config_of(docs: list[dict], pod_spec: dict, container: dict, argv: list[str]) -> ServeConfig:
    if "--config" not in argv:
        raise ValueError(f"container {container['name']}: engram serve {' '.join(argv)} reads no --config")
    path = argv[argv.index("--config") + 1]
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        raise ValueError(f"container {container['name']}: --config {path} is on no volume it mounts")
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"])
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    sources = [s["configMap"] for s in volume.get("projected", {}).get("sources", []) if "configMap" in s]
    sources += [volume["configMap"]] if "configMap" in volume else []
    for source in sources:
        items = {i["path"]: i["key"] for i in source.get("items", [])} if "items" in source else None
        key = items.get(relative) if items is not None else relative
        maps = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == source["name"]]
        if key and len(maps) == 1 and key in maps[0].get("data", {}):
            text = maps[0]["data"][key]
            return ServeConfig(argv=argv, path=path, mount_path=mount["mountPath"], config_map=source["name"],
                               key=key, text=text, config=yaml.safe_load(text) or {})
    raise ValueError(f"container {container['name']}: --config {path}: no ConfigMap key behind it")


# --- lint: what the schemas cannot catch ----------------------------------------------------------

def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def ray_requirement() -> str:
    """pyproject.toml's requirement on ray, e.g. 'ray[default,train]>=2.59,<3'."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [d for d in deps if re.match(r"ray\b", d)]
    return req


def image_ray_version(dockerfile: str) -> str | None:
    """The Ray release the image is built on: deploy/Dockerfile's default RAY_TAG."""
    m = re.search(r"^ARG RAY_TAG=([0-9.]+)-py311$", dockerfile, re.M)
    return m[1] if m else None


def image_tag(version: str, ray_version: str, gpu: bool = False) -> str:
    """engram-memory:<project version>-ray<Ray version>-py311[-gpu]."""
    return f"{IMAGE}:{version}-ray{ray_version}-py311{'-gpu' if gpu else ''}"


def lint(docs: list[dict], dockerfile: str | None = None, version: str | None = None) -> list[str]:
    """Problems the schemas cannot see, one line each (empty: none)."""
    version = version or project_version()
    dockerfile = dockerfile if dockerfile is not None else (DEPLOY / "Dockerfile").read_text()
    problems: list[str] = []
    clusters = by_kind(docs, "RayCluster")
    if len(clusters) != 1:
        return [f"expected one RayCluster, found {len(clusters)}"]
    for check in (_ray_containers_first, _start_params_are_strings, _autoscaling_off,
                  _custom_resources, _auth_decided, _pdbs, _service_ports, _pod_monitors,
                  _rayjobs, _serve_config):
        problems += check(docs)
    problems += _image_tags(docs, version, dockerfile)
    return problems


def _ray_containers_first(docs) -> list[str]:
    problems = []
    for g in groups(docs):
        group, containers = g.name, g.pod_spec["containers"]
        expected = "ray-head" if g.node_type == "head" else "ray-worker"
        if containers[0]["name"] != expected or "command" in containers[0] or "args" in containers[0]:
            problems.append(f"group {group}: containers[0] must be the Ray container {expected!r} "
                            f"without command/args (KubeRay runs `ray start` in containers[0])")
        problems += [f"group {group}: container {c['name']!r} looks like a Ray container but is not first"
                     for c in containers[1:] if c["name"].startswith("ray-")]
    return problems


def _start_params_are_strings(docs) -> list[str]:
    return [f"group {g.name}: rayStartParams[{key!r}] = {value!r} must be a string"
            for g in groups(docs)
            for key, value in g.spec.get("rayStartParams", {}).items() if not isinstance(value, str)]


def _autoscaling_off(docs) -> list[str]:
    cluster = by_kind(docs, "RayCluster")[0]
    problems = []
    if cluster["spec"].get("enableInTreeAutoscaling") is not False:
        problems.append("spec.enableInTreeAutoscaling must be false: shards hold state")
    for g in cluster["spec"]["workerGroupSpecs"]:
        if not g.get("replicas") == g["minReplicas"] == g["maxReplicas"]:
            problems.append(f"group {g['groupName']}: replicas {g.get('replicas')}, minReplicas "
                            f"{g['minReplicas']} and maxReplicas {g['maxReplicas']} must be equal")
    if cluster["spec"]["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('head rayStartParams num-cpus must be "0": nothing runs on the head')
    return problems


def _custom_resources(docs) -> list[str]:
    """Each worker group declares a custom Ray resource of its own that pins actors to it."""
    problems, owner = [], {}
    for g in by_kind(docs, "RayCluster")[0]["spec"]["workerGroupSpecs"]:
        try:
            custom = custom_resources(g.get("rayStartParams", {}))
        except json.JSONDecodeError as err:
            problems.append(f"group {g['groupName']}: rayStartParams resources is not JSON: {err}")
            continue
        if not custom:
            problems.append(f"group {g['groupName']}: declares no custom Ray resource")
        for name in custom:
            if name in owner:
                problems.append(f"resource {name!r} declared by groups {owner[name]} and {g['groupName']}")
            owner[name] = g["groupName"]
    return problems


def _auth_decided(docs) -> list[str]:
    mode = by_kind(docs, "RayCluster")[0]["spec"].get("authOptions", {}).get("mode")
    return [] if mode in ("token", "disabled") else ["spec.authOptions.mode must be set explicitly"]


def _selected(docs, selector: dict[str, str]) -> list[Group]:
    """The groups whose pods carry every label of `selector`."""
    return [g for g in groups(docs) if all(g.labels.get(k) == v for k, v in selector.items())]


def _container_ports(spec: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", []) if "name" in p}


def _pdbs(docs) -> list[str]:
    problems = []
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        name, spec = pdb["metadata"]["name"], pdb["spec"]
        value = spec.get("minAvailable")
        if "maxUnavailable" in spec or not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"PodDisruptionBudget {name}: only an integer minAvailable works with "
                            f"RayCluster pods (no scale subresource), got {spec}")
            continue
        matched = sum(g.replicas for g in _selected(docs, spec["selector"]["matchLabels"]))
        if not 0 < value <= matched:
            problems.append(f"PodDisruptionBudget {name}: minAvailable {value} but it selects {matched} pods")
    return problems


def _service_ports(docs) -> list[str]:
    problems = []
    for svc in by_kind(docs, "Service"):
        selected = _selected(docs, svc["spec"].get("selector", {}))
        if not selected:
            problems.append(f"Service {svc['metadata']['name']}: selects no RayCluster pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for g in selected:
                ports = _container_ports(g.pod_spec)
                if (target not in ports) if isinstance(target, str) else (target not in ports.values()):
                    problems.append(f"Service {svc['metadata']['name']}: targetPort {target!r} is not "
                                    f"a container port of group {g.name}")
    return problems


def _pod_monitors(docs) -> list[str]:
    problems = []
    for monitor in by_kind(docs, "PodMonitor"):
        selected = _selected(docs, monitor["spec"]["selector"]["matchLabels"])
        if not selected:
            problems.append(f"PodMonitor {monitor['metadata']['name']}: selects no RayCluster pods")
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            problems += [f"PodMonitor {monitor['metadata']['name']}: port {endpoint['port']!r} is not a "
                         f"container port of group {g.name}"
                         for g in selected if endpoint["port"] not in _container_ports(g.pod_spec)]
    return problems


def _rayjobs(docs) -> list[str]:
    """Each RayJob attaches to the running cluster, checkpoints periodically into a folder and
    resumes from that folder (the documented recovery: rerun the job)."""
    name = by_kind(docs, "RayCluster")[0]["metadata"]["name"]
    problems = []
    for job in by_kind(docs, "RayJob"):
        spec, job_name = job["spec"], job["metadata"]["name"]
        if spec.get("clusterSelector") != {"ray.io/cluster": name}:
            problems.append(f"RayJob {job_name}: clusterSelector must be "
                            f"{{ray.io/cluster: {name}}} to attach to the running cluster")
        if "rayClusterSpec" in spec or spec.get("shutdownAfterJobFinishes"):
            problems.append(f"RayJob {job_name}: must neither create nor shut down a cluster")
        flags = dict(re.findall(r"(--checkpoint-dir|--checkpoint-every|--resume-from)[ =]([^\s)]+)", spec["entrypoint"]))
        if not flags.get("--checkpoint-dir") or int(flags.get("--checkpoint-every", 0)) <= 0:
            problems.append(f"RayJob {job_name}: entrypoint must checkpoint periodically "
                            f"(--checkpoint-dir DIR --checkpoint-every N)")
        elif flags.get("--resume-from") != flags["--checkpoint-dir"]:
            problems.append(f"RayJob {job_name}: entrypoint must --resume-from its --checkpoint-dir "
                            f"{flags['--checkpoint-dir']} (a rerun continues from the last checkpoint)")
    return problems


def _offering(docs, resource: str) -> list[tuple[Group, float]]:
    """The groups whose pods declare `resource`, with the units each pod declares."""
    out = []
    for g in groups(docs):
        units = custom_resources(g.spec.get("rayStartParams", {})).get(resource, 0)
        if units:
            out.append((g, units))
    return out


def _has_gpu(g: Group) -> bool:
    limits = g.pod_spec["containers"][0].get("resources", {}).get("limits", {})
    return any(key.endswith("gpu") and parse_quantity(value) > 0 for key, value in limits.items())


def _serve_config(docs) -> list[str]:
    """The tables cluster's config agrees with the RayCluster: one shard per pod that declares
    its resource, the ports those pods declare, cold shards' LMDB on a shared volume of every
    pod they may run (or restart) on, restarts on, hot shards on GPU pods iff hot_device is cuda."""
    try:
        serve = serve_config(docs)
    except ValueError as err:
        return [str(err)]
    if serve is None:
        return ["the head has no `engram serve` sidecar: nothing starts the shards"]
    c = serve.config
    where = f"{serve.config_map}/{serve.key}"
    shard_resource, hot_resource = c.get("shard_resource"), c.get("hot_resource") or c.get("shard_resource")
    num_shards, num_hot = c.get("num_shards", 0), c.get("num_hot", 0)
    problems = []
    wanted = {shard_resource: num_shards}
    if num_hot:
        wanted[hot_resource] = wanted.get(hot_resource, 0) + num_hot
    for resource, count in wanted.items():
        if not count:
            continue
        pods = sum(g.replicas * units for g, units in _offering(docs, resource))
        if pods != count:
            problems.append(f"{where}: {count} shards take {resource!r} but the pods declare {pods} units")
    for g in groups(docs):
        units = {r: custom_resources(g.spec.get("rayStartParams", {})).get(r, 0) for r in wanted}
        if sum(units.values()) > 1:
            problems.append(f"group {g.name}: declares {sum(units.values()):g} shard units per pod; shards "
                            f"listen on fixed ports, one per pod")
        if sum(units.values()):
            ports = _container_ports(g.pod_spec)
            if ports.get("grpc") != c.get("port") or ports.get("engram-metrics") != c.get("metrics_port"):
                problems.append(f"group {g.name}: ports grpc/engram-metrics {ports.get('grpc')}/"
                                f"{ports.get('engram-metrics')} != {where} port {c.get('port')} "
                                f"metrics_port {c.get('metrics_port')}")
    if c.get("host") != "0.0.0.0":
        problems.append(f"{where}: host must be 0.0.0.0: shards are dialled at their pod's IP")
    if c.get("max_restarts", 3) == 0:
        problems.append(f"{where}: max_restarts 0: a shard whose pod dies stays dead")
    durable_hot = hot_resource if num_hot and c.get("hot_device", "auto") != "cuda" else None
    problems += _storage_volumes(docs, where, c.get("storage", {}).get("path"), shard_resource, durable_hot)
    problems += _checkpoint_root(docs, where, c.get("storage", {}), [shard_resource, hot_resource if num_hot else None])
    problems += _hot_devices(docs, where, c.get("hot_device", "auto"), hot_resource if num_hot else None)
    return problems


def _storage_volumes(docs, where: str, path: str | None, shard_resource: str,
                     hot_resource: str | None = None) -> list[str]:
    """storage.path is on a ReadWriteMany claim in every pod a shard with files may run on: the
    cold shards', and the hot shards' (`hot_resource`) that keep rows in host DRAM over LMDB
    (`hot-NNNN/`; a hot shard on a GPU pod keeps them on the GPU, without files)."""
    if not path:
        return [f"{where}: storage.path unset: cold shards would keep their rows only in DRAM"]
    claims = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    problems = []
    offering = _offering(docs, shard_resource)
    if hot_resource is not None:
        offering += [(g, u) for g, u in _offering(docs, hot_resource) if not _has_gpu(g) and g not in
                     [h for h, _ in offering]]
    for g, _ in offering:
        mounts = [m for m in g.pod_spec["containers"][0].get("volumeMounts", [])
                  if (path.rstrip("/") + "/").startswith(m["mountPath"].rstrip("/") + "/")]
        volumes = {v["name"]: v for v in g.pod_spec.get("volumes", [])}
        claim = volumes.get(mounts[0]["name"], {}).get("persistentVolumeClaim", {}).get("claimName") if mounts else None
        if claim is None:
            problems.append(f"group {g.name}: no PersistentVolumeClaim mounted at {where} storage.path {path}")
        elif "ReadWriteMany" not in claims.get(claim, {}).get("spec", {}).get("accessModes", []):
            problems.append(f"group {g.name}: storage.path {path} is on {claim!r}, not a ReadWriteMany claim: "
                            f"a shard restarted on another pod would not find its files")
    return problems


def _checkpoint_root(docs, where: str, storage: dict, resources: list[str | None]) -> list[str]:
    """The checkpoint root (storage.checkpoint_root, default <path>/checkpoints) must be on a volume
    every shard pod mounts: shards write their part of a checkpoint there and refuse any other path."""
    root = storage.get("checkpoint_root") or (f"{storage['path'].rstrip('/')}/checkpoints" if storage.get("path") else None)
    if root is None:
        return [f"{where}: no storage.checkpoint_root: the shards would refuse every checkpoint"]
    problems = []
    for resource in filter(None, resources):
        for g, _ in _offering(docs, resource):
            mounts = [m for m in g.pod_spec["containers"][0].get("volumeMounts", [])
                      if (root.rstrip("/") + "/").startswith(m["mountPath"].rstrip("/") + "/")]
            if not mounts:
                problems.append(f"group {g.name}: nothing mounted at {where} checkpoint root {root}: its shards "
                                f"could not write checkpoints")
    return problems


def _hot_devices(docs, where: str, device: str, hot_resource: str | None) -> list[str]:
    if hot_resource is None:
        return []
    problems = []
    for g, _ in _offering(docs, hot_resource):
        if device == "cuda" and not _has_gpu(g):
            problems.append(f"group {g.name}: {where} hot_device cuda but the pods declaring "
                            f"{hot_resource!r} have no GPU")
        if device == "cpu" and _has_gpu(g):
            problems.append(f"group {g.name}: hot shards on GPU pods with hot_device cpu leave the GPUs idle")
    return problems


def _image_tags(docs, version: str, dockerfile: str) -> list[str]:
    """Every image is engram-memory:<project version>-ray<the image's Ray>-py311[-gpu], that Ray is
    the RayCluster's rayVersion and inside pyproject's range, and the Dockerfile builds that."""
    from packaging.requirements import Requirement

    ray_version = image_ray_version(dockerfile)
    if ray_version is None:
        return ["deploy/Dockerfile: no `ARG RAY_TAG=<ray version>-py311`"]
    problems = []
    if not Requirement(ray_requirement()).specifier.contains(ray_version):
        problems.append(f"deploy/Dockerfile: Ray {ray_version} is outside pyproject's {ray_requirement()}")
    cluster = by_kind(docs, "RayCluster")[0]
    if cluster["spec"].get("rayVersion") != ray_version:
        problems.append(f"RayCluster rayVersion {cluster['spec'].get('rayVersion')!r} != the image's Ray {ray_version}")
    images = [c["image"] for g in groups(docs) for c in g.pod_spec["containers"]]
    for job in by_kind(docs, "RayJob"):
        images += [c["image"] for c in job["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", [])]
    allowed = {image_tag(version, ray_version), image_tag(version, ray_version, gpu=True)}
    problems += [f"image {image!r} must be {image_tag(version, ray_version)}[-gpu]"
                 for image in images if image.rsplit("/", 1)[-1] not in allowed]
    built = set(re.findall(rf"-t ({re.escape(IMAGE)}:\S+)", dockerfile))
    if not built or not built <= allowed:
        problems.append(f"deploy/Dockerfile: builds {sorted(built)}, not {sorted(allowed)}")
    if f'org.opencontainers.image.version="{version}"' not in dockerfile:
        problems.append(f'deploy/Dockerfile: LABEL org.opencontainers.image.version="{version}" missing')
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", type=Path)
    parser.add_argument("--check", action="store_true", help="validate CRD kinds and lint instead of printing")
    args = parser.parse_args(argv)
    docs = render(args.overlay)
    if not args.check:
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
        return 0
    problems = schema_errors(docs) + lint(docs)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{args.overlay}: {len(docs)} documents, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
