"""bench/bench_train_overhead.py end to end at tiny size, on shards in local processes (what a
machine without Ray runs), with --profile: the four modes train, the summary has what it promises
and the trace holds the fetches. Speeds are printed by the benchmark, not asserted. (On a GPU,
bench/gpu_session.sh runs the bench itself with --device cuda.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # four tiny-preset models train 6 steps each, then 8 traced steps


def run_bench(script: str, args: list[str], home: Path) -> dict:
    """The bench's --json object; HOME is a temp dir so its corpus cache lands there."""
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_modes_and_profile_on_local_processes(corpus_dir, tmp_path):
    out = run_bench("bench_train_overhead.py", [
        "--corpus", str(corpus_dir), "--steps", "6", "--block", "2", "--settle", "0", "--warmup", "0",
        "--device", "cpu", "--cluster", "processes", "--niceness", "0",
        "--profile", str(tmp_path / "trace"), "--profile-steps", "2"], tmp_path)
    assert (out["device"], out["cluster"], out["hot_shards"]) == ("cpu", "processes", 1)
    assert set(out["step_ms"]) == {"local", "sync", "prefetch", "stale"}
    assert all(v > 0 for v in out["step_ms"].values()) and out["unique_rows_per_step"] > 0
    profile = out["profile"]
    assert profile["steps"] == 2 and profile["fetches"] >= 2 and profile["pushes"] >= 2, profile
    assert (tmp_path / "trace" / "trace.json.gz").stat().st_size > 0
    assert out["paired"]["prefetch"]["turns"] == 2  # 3 turns of 2 steps, the first left out
