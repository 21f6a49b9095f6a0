"""Generate the Python gRPC stubs of proto/engram_memory/v1/memory.proto into memory_service/rpc/.

    .venv/bin/python scripts/generate_stubs.py            # regenerate the committed stubs
    .venv/bin/python scripts/generate_stubs.py --out DIR  # elsewhere (the staleness test)

protoc writes `engram_memory/v1/memory_pb2*.py` and imports the messages in the grpc module as
`from engram_memory.v1 import memory_pb2`, a package that does not exist here. This script
flattens the output into one folder and rewrites that import to
`from memory_service.rpc import memory_pb2`, so the stubs import as
`from memory_service.rpc import memory_pb2, memory_pb2_grpc`. The output is a pure function of the
.proto and the pinned grpcio-tools version (tests/memory_service/rpc/test_stubs.py checks the committed copy).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "engram_memory/v1/memory.proto"
DEFAULT_OUT = ROOT / "memory_service" / "rpc"
PACKAGE = "memory_service.rpc"
GENERATED = ("memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py")

INIT = f'''"""Generated gRPC stubs of proto/{PROTO}.

Every file in this folder is written by `python scripts/generate_stubs.py`; never edit by hand.
Change the .proto and rerun the script (tests/memory_service/rpc/test_stubs.py fails while these files are stale).
"""
'''


def run_protoc(out: Path) -> None:
    """Run the protoc bundled with grpcio-tools, writing the stubs under `out/engram_memory/v1/`."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
           f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO]
    subprocess.run(cmd, check=True, cwd=ROOT)


def fix_imports(source: str) -> str:
    """Point protoc's absolute import of the messages module at this package."""
    generated_import = "from engram_memory.v1 import memory_pb2"
    if generated_import not in source:
        return source
    return source.replace(generated_import, f"from {PACKAGE} import memory_pb2")


def generate(out: Path) -> list[Path]:
    """Write __init__.py and the flattened, import-fixed stubs into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(Path(tmp))
        generated_dir = Path(tmp) / Path(PROTO).parent
        written = [out / "__init__.py"]
        written[0].write_text(INIT)
        for name in GENERATED:
            target = out / name
            target.write_text(fix_imports((generated_dir / name).read_text()))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
