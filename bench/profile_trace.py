"""A torch.profiler trace of training steps, and what it says about the table service's fetches.

`step_profiler(path, device, steps)` records `steps` steps (after 2 skipped and 1 warm-up; call
`.step()` as each training step ends) with every thread: the Engram ranges trainer/remote_tables.py
names run on client and push threads, which torch records only from the thread that started it
unless told to record all (torch >= 2.7). The chrome trace goes to `path` (gzipped for a .gz
name; chrome://tracing and ui.perfetto.dev open either), CPU and, on CUDA, GPU activity.

`summarize(path)` totals the ranges: "engram.fetch" (a fetch in flight, send to rows ready),
"engram.wait" (the forward blocked on rows), "engram.push" and the steps ("ProfilerStep#N"). The
share of fetch time hidden is 1 - wait / fetch: what prefetching bought.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, schedule

RANGES = {"fetch": "engram.fetch", "wait": "engram.wait", "push": "engram.push"}  # summary key -> range name
COUNTS = {"fetch": "fetches", "wait": "waits", "push": "pushes", "step": "steps"}
STEP_PREFIX = "ProfilerStep#"
SKIPPED_STEPS, WARMUP_STEPS = 2, 1  # the first steps compile kernels and fill caches


def step_profiler(path: str | Path, device: str, steps: int) -> profile:
    """A profiler (use as a context manager) that records `steps` steps after the skipped and
    warm-up ones into the chrome trace `path`. Training must run SKIPPED_STEPS + WARMUP_STEPS +
    steps steps or more."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    return profile(activities=activities, experimental_config=_all_threads(),
                   schedule=schedule(wait=SKIPPED_STEPS, warmup=WARMUP_STEPS, active=steps, repeat=1),
                   on_trace_ready=lambda p: p.export_chrome_trace(str(path)))


def _all_threads():
    """The experimental config that records every thread, or None where torch lacks it."""
    try:
        from torch._C._profiler import _ExperimentalConfig

        return _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):  # torch < 2.7: fetch and push ranges will be missing
        return None


def summarize(path: str | Path) -> dict:
    """{fetch_ms, wait_ms, push_ms, step_ms: summed durations; fetches, waits, pushes, steps:
    range counts; hidden: 1 - wait / fetch (None without fetches)} of a chrome trace."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    # CPU-side ranges only: on CUDA each range is mirrored on the GPU's timeline (gpu_user_annotation)
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    out: dict = {}
    for key in COUNTS:
        picked = [e for e in ranges
                  if (e["name"].startswith(STEP_PREFIX) if key == "step" else e["name"] == RANGES[key])]
        out[f"{key}_ms"] = sum(float(e["dur"]) for e in picked) / 1e3  # chrome traces count microseconds
        out[COUNTS[key]] = len(picked)
    out["hidden"] = 1 - out["wait_ms"] / out["fetch_ms"] if out["fetch_ms"] > 0 else None
    return out


def summary_line(s: dict) -> str:
    """One line: how much of the steps' fetch time the forward did not wait for."""
    hidden = "n/a (no engram.fetch ranges)" if s["hidden"] is None else f"{100 * s['hidden']:.1f}% of fetch time hidden"
    return (f"profile: {s['steps']} steps {s['step_ms']:.1f} ms; fetch {s['fetch_ms']:.1f} ms in flight "
            f"({s['fetches']} fetches), wait {s['wait_ms']:.1f} ms ({s['waits']} waits): {hidden}; "
            f"push {s['push_ms']:.1f} ms ({s['pushes']} pushes)")


if __name__ == "__main__":  # summarize a trace: python bench/profile_trace.py trace.json.gz
    import sys

    print(summary_line(summarize(sys.argv[1])))
