"""trainer.colocation: the `engram` CLI's process gets the OpenMP spin setting before torch loads
(libgomp reads it once), and an explicit setting wins."""
import os
import subprocess
import sys

PROBE = "import os, sys, trainer.cli; print(os.environ['GOMP_SPINCOUNT'])"


def run(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


def test_cli_sets_the_spin_count_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = run(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10000"]
    assert "torch was imported first" not in done.stderr  # so libgomp saw it


def test_an_explicit_spin_count_wins():
    done = run({**os.environ, "GOMP_SPINCOUNT": "300000"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["300000"]
