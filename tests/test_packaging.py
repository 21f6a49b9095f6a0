"""pyproject.toml's dependency ranges hold what they promise: the committed gRPC stubs load at the
lowest grpcio/protobuf the ranges allow (and refuse anything older, so the floor is not too low),
and the heavy optional parts (triton, matplotlib, grpcio-tools) stay out of a plain install."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RPC = ROOT / "memory_service" / "rpc"
# the releases just below the floors: the stubs must refuse them
GRPCIO_BELOW_FLOOR = "1.81.1"
PROTOBUF_BELOW_FLOOR = "7.34.2"
IMPORT_STUBS = ("from memory_service.rpc import memory_pb2, memory_pb2_grpc; "
                "from grpc_health.v1 import health; import grpc, google.protobuf; "
                "print(grpc.__version__, google.protobuf.__version__)")


def requirement(name: str, group: str | None = None) -> Requirement:
    deps = PYPROJECT["project"]["optional-dependencies"][group] if group else PYPROJECT["project"]["dependencies"]
    (req,) = [r for r in map(Requirement, deps) if r.name == name]
    return req


def floor(name: str) -> str:
    (low,) = [s.version for s in requirement(name).specifier if s.operator == ">="]
    return low


def protobuf_gencode_version() -> str:
    source = (RPC / "memory_pb2.py").read_text()
    m = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", source)
    return ".".join(m.groups())


def test_stubs_were_generated_by_the_lowest_allowed_grpcio_tools():
    generated = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (RPC / "memory_pb2_grpc.py").read_text())[1]
    (tools,) = requirement("grpcio-tools", "dev").specifier
    assert (tools.operator, tools.version) == ("==", generated) == ("==", floor("grpcio"))
    assert floor("grpcio-health-checking") == floor("grpcio")
    assert Requirement(f"protobuf>={protobuf_gencode_version()}").specifier.contains(floor("protobuf"))


def test_optional_parts_stay_out_of_a_plain_install():
    """The installed metadata (what `pip install .` resolves): triton only with the gpu extra,
    matplotlib only with demo, grpcio-tools only with dev; PyYAML always (the config file)."""
    requires = [Requirement(r) for r in importlib.metadata.requires("engram-memory")]
    unconditional = {r.name.lower() for r in requires if r.marker is None}
    assert {"triton", "matplotlib", "grpcio-tools"}.isdisjoint(unconditional)
    assert {"pyyaml", "ray", "grpcio", "protobuf"} <= unconditional
    extras = {r.name.lower(): str(r.marker) for r in requires if r.marker is not None}
    assert extras["triton"] == 'extra == "gpu"' and extras["matplotlib"] == 'extra == "demo"'


def pip_target(directory: Path, *specs: str, deps: bool = True) -> Path:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--only-binary=:all:", "--target", str(directory),
           *([] if deps else ["--no-deps"]), *specs]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return directory


def import_stubs(*path: Path) -> subprocess.CompletedProcess:
    """Imports the stubs in a fresh interpreter that sees only `path` and the source tree (-S: no
    site-packages, so nothing of this venv's grpcio or protobuf)."""
    env = {"PYTHONPATH": ":".join(map(str, [*path, ROOT]))}
    return subprocess.run([sys.executable, "-S", "-c", IMPORT_STUBS], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def lowest(tmp_path_factory) -> Path:
    specs = [f"{name}=={floor(name)}" for name in ("grpcio", "grpcio-health-checking", "protobuf")]
    return pip_target(tmp_path_factory.mktemp("lowest"), *specs)


def test_stubs_load_at_the_lowest_allowed_versions(lowest):
    out = import_stubs(lowest)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [floor("grpcio"), floor("protobuf")]


def test_stubs_refuse_a_grpcio_below_the_floor(lowest, tmp_path):
    old = pip_target(tmp_path / "grpcio", f"grpcio=={GRPCIO_BELOW_FLOOR}", deps=False)
    out = import_stubs(old, lowest)
    assert out.returncode != 0 and f"depends on grpcio>={floor('grpcio')}" in out.stderr, out.stderr


def test_stubs_refuse_a_protobuf_below_the_gencode(lowest, tmp_path):
    old = pip_target(tmp_path / "protobuf", f"protobuf=={PROTOBUF_BELOW_FLOOR}", deps=False)
    out = import_stubs(old, lowest)
    assert out.returncode != 0 and "Runtime version cannot be older than the linked gencode" in out.stderr, out.stderr
