"""The committed gRPC stubs in memory_service/rpc/ are exactly what scripts/generate_stubs.py writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "generate_stubs.py"
COMMITTED = ROOT / "memory_service" / "rpc"
FIX = f"{Path(sys.executable).name} scripts/generate_stubs.py"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_committed_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert sorted(committed) == sorted(fresh), f"memory_service/rpc/ files differ: run `{FIX}`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale} in memory_service/rpc/: run `{FIX}`"


def test_stubs_import_from_the_package():
    from memory_service.rpc import memory_pb2, memory_pb2_grpc

    source = (COMMITTED / "memory_pb2_grpc.py").read_text()
    assert "from engram_memory" not in source
    assert memory_pb2_grpc.MemoryServiceStub
    assert memory_pb2.DESCRIPTOR.package == "engram_memory.v1"


def test_proto_folder_is_not_a_python_package():
    # `proto` is already a library's import name (proto-plus): keep the folder free of .py files
    assert not list((ROOT / "proto").rglob("*.py"))
