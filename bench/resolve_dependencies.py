"""Resolver dry runs of this project's dependency ranges (issue 21, point 8): `pip install --dry-run
--ignore-installed --report` of the project with ray at the lowest and the highest release the range
allows: without and with the gpu extra, and with grpcio/protobuf at their floors (the versions
tests/test_packaging.py loads the stubs with); what each resolution would install.

    .venv/bin/python bench/resolve_dependencies.py [--ray 2.59.0 2.60.0]

torch is given as the CPU build (as `make` installs it on CPU machines): PyPI's default Linux torch
wheel is the CUDA build, which itself requires triton, so "no triton without the gpu extra" is a
statement about this project's own requirements. Needs the package index; takes about a minute.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_CPU = "torch==2.13.0+cpu"
WATCHED = ("ray", "grpcio", "grpcio-health-checking", "protobuf", "torch", "triton", "matplotlib",
           "grpcio-tools", "pyyaml")


def resolve(*specs: str) -> dict[str, str]:
    """name -> version of everything `pip install specs` would install into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                        "--report", str(report), *specs], check=True, cwd=ROOT, stderr=subprocess.PIPE)
        install = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in install}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray", nargs="+", default=["2.59.0", "2.60.0"])
    args = parser.parse_args()
    failures = 0
    floors = ["grpcio==1.82.1", "grpcio-health-checking==1.82.1", "protobuf==7.35.1"]
    for ray in args.ray:
        for extras, pins in (("", []), ("[gpu]", []), ("", floors)):
            start = time.perf_counter()
            found = resolve(f".{extras}", f"ray[default,train]=={ray}", TORCH_CPU, *pins)
            picked = "  ".join(f"{n}={found[n]}" for n in WATCHED if n in found)
            has_triton = "triton" in found
            ok = (has_triton == (extras == "[gpu]") and found.get("ray") == ray
                  and all(found.get(pin.split("==")[0]) == pin.split("==")[1] for pin in pins))
            failures += not ok
            print(f"pip install .{extras or '     '} ray=={ray}: {len(found)} packages in "
                  f"{time.perf_counter() - start:.0f} s, triton {'yes' if has_triton else 'no '} "
                  f"[{'ok' if ok else 'UNEXPECTED'}]  {picked}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
