"""Where a request's time goes: a named load on the embedded cluster, each shard actor and the
client sampled with py-spy (every thread), the samples bucketed into stages (issue 23, point 1).

Loads (2 all-DRAM shard actors, one client: this process):
  fetch  16k distinct ids x fp32 64 per fetch, same-host path (bench/bench_fetch.py's headline cell)
  adam   fetch + push of 16k ids with dense-equivalent `adam` (bench/bench_table_optimizer.py's cell)
  small  8 tables x 1 id per fetch (a decode step; bench/bench_small_fetch.py)

    python bench/profile_service.py [--loads fetch adam small] [--seconds 8] [--rate 100] [--no-native]

py-spy sees only threads that run Python (Ray's C++ core-worker threads and gRPC's completion
queue threads are invisible to it), so beside the samples each process's CPU time per thread name
is read from /proc (utime + stime over the window), each thread named as Python names it where
py-spy saw it: that is where Ray's own threads show. The stage of a sample is that of its
leaf-most frame matching a rule of STAGES (the rules are tried in their order on each frame, leaf
first); a sample matching none is "other". With native frames (the default; py-spy 0.4.3's
--native works here) py-spy also samples threads blocked in a wait: those land in "idle" (an
empty pool or event loop) or "locks/waits" (a lock or GIL wait), so "thread-ms per request"
counts time, not only CPU; the /proc table is CPU alone.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from memory_service.server.shard_process import SHARD_ENV, reexec_with  # noqa: E402

reexec_with(SHARD_ENV)

from memory_service.cluster import ClusterConfig, launch  # noqa: E402
from memory_service.config import OptimizerConfig, TableConfig  # noqa: E402
from memory_service.ray_attach import init_local_ray  # noqa: E402
from report import write_results  # noqa: E402  (bench/report.py)

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
WIDTH = 64
TOP_LEAVES = 6  # leaf frames listed per process
# (stage, regular expression over one frame "function (file:line)" or "function (library.so)").
# A sample takes the stage of its leaf-most frame that matches; rules are tried in this order.
# numpy's and libc's generic frames match nothing on purpose, so such a sample takes the stage of
# the Python frame that called numpy (a row copy in row_reader.py is "copy", a sort in router.py
# "dedup/sort").
STAGES: tuple[tuple[str, str], ...] = (
    ("idle", r"^(select|poll|epoll_wait|_worker|get) \((selectors|concurrent/futures/thread|queue)\.py|"
             r"epoll_wait|pthread_cond_wait|pthread_cond_timedwait|clock_nanosleep|^sleep |^poll \(libc|"
             r"_poll_wrapper"),
    ("locks/waits", r"^(acquire|wait|_wait_for_tstate_lock|__enter__) \(threading\.py|sem_wait|"
                    r"lock_PyThread|acquire_timed|futex|PyThread_acquire_lock|take_gil|drop_gil"),
    ("catch-up", r"catch_up\.py"),
    ("optimizer", r"storage/optimizer\.py|local_table_optimizer|_kernels.*(adam|sgd|adagrad)"),
    ("initial rows", r"memory_service/rows\.py|philox|initial_rows"),
    ("slot lookup", r"memory_service/ids\.py|SlotIndex|slot_lookup|slots_of"),
    ("dedup/sort", r"router\.py|unique|argsort|_sort|^sort |dedup|searchsorted|lexsort"),
    ("request decode", r"request_guard\.py|decode_ids|decode_rows|_decode_|FromString|ParseFromString|"
                       r"_parse_|deserializ"),
    ("encode", r"encode_|SerializeToString|reply_layout\.py|codec\.py|serializ"),
    ("copy", r"row_reader\.py|row_writer\.py|reply_files\.py|fetch_replies\.py|tiers/dram\.py|gather|"
             r"__memmove|__memcpy|memcpy|memmove|copyto|tobytes|frombuffer|^take |mmap|shared_memory|"
             r"from_numpy|PyArray_TakeFrom|PyArray_AssignArray|raw_array_assign|gather_table"),
    ("gRPC", r"grpc|cygrpc|_channel\.py|_server\.py|libgrpc|admission\.py|servicer\.py|transport\.py|"
             r"fetch_round\.py|push_round\.py"),
    ("asyncio", r"asyncio/|base_events|events\.py|_run_once|uvloop"),
    ("Ray", r"ray/|_raylet|libray|core_worker"),
)
_RULES = [(stage, re.compile(rule)) for stage, rule in STAGES]


def stage_of(frames: list[str]) -> str:
    """The stage of one sample's stack (root first): its leaf-most frame matching a rule."""
    for frame in reversed(frames):
        for stage, rule in _RULES:
            if rule.search(frame):
                return stage
    return "other"


def buckets(raw: str) -> tuple[Counter, dict[int, str], Counter]:
    """({stage: samples}, {thread id: Python thread name}, {leaf frame: samples} of the samples
    not idle) of py-spy's raw (collapsed) output."""
    out: Counter = Counter()
    names: dict[int, str] = {}
    leaves: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if (thread := re.match(r"thread \((\d+)\): (.*)", frames[0])) is not None:
            names[int(thread.group(1))] = thread.group(2)
        stage = stage_of(frames[1:])
        out[stage] += int(count)
        if stage != "idle":
            leaves[f"{stage}: {frames[-1]}"] += int(count)
    return out, names, leaves


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{thread id: (name, CPU seconds so far)} of a process's threads, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_name(before: dict, after: dict, python_names: dict[int, str]) -> dict[str, float]:
    """CPU seconds between two thread_cpu() readings per thread name (the Python name where py-spy
    saw the thread, else the kernel's; trailing numbers dropped, so a pool's threads add up)."""
    out: Counter = Counter()
    for tid, (name, cpu) in after.items():
        name = python_names.get(tid, name)
        out[re.sub(r"[-_.]?\d+$", "", name)] += cpu - before.get(tid, (name, 0.0))[1]
    return dict(out)


class Load:
    """A named loop of client requests against a cluster; `step()` sends one request round."""

    def __init__(self, name: str, client) -> None:
        self.name, self.client, self.done = name, client, 0
        rng = np.random.default_rng(0)
        kind = "adam" if name == "adam" else "sgd"
        tables = 8 if name == "small" else 1
        rows = 131072
        self.tables = [TableConfig(f"t{i}", rows, WIDTH, seed=i, optimizer=OptimizerConfig(kind, lr=1e-2))
                       for i in range(tables)]
        for cfg in self.tables:
            client.create_table(cfg)
            if name != "adam":  # every row stored first, as bench_fetch does: no fetch pays for lazy init
                for start in range(0, rows, 65536):
                    ids = np.arange(start, start + 65536)
                    client.push({cfg.name: (ids, np.zeros((len(ids), WIDTH), np.float32))}, step=1)
        self.ids = rng.choice(rows, 16384, replace=False)
        self.grads = (rng.standard_normal((16384, WIDTH)) * 1e-3).astype(np.float32)
        self.one = {cfg.name: np.array([7]) for cfg in self.tables}
        self.requests_per_step = {"fetch": 1, "adam": 2, "small": 1}[name]

    def step(self) -> None:
        if self.name == "small":
            self.client.fetch(self.one)
        elif self.name == "fetch":
            self.client.fetch({"t0": self.ids})
        else:
            self.client.fetch({"t0": self.ids})
            self.client.push({"t0": (self.ids, self.grads)}, step=self.done + 1, lr=1e-2)
        self.done += 1


def profile(load: Load, pids: dict[str, int], seconds: float, rate: int, native: bool, workdir: str) -> dict:
    """Runs `load` in a thread while py-spy records each of `pids`; returns per process the stage
    counts, the thread CPU over the window, and the requests sent in it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            load.step()

    for _ in range(20):  # warm-up: rows written, channels and caches warm
        load.step()
    worker = threading.Thread(target=loop, name="load", daemon=True)
    worker.start()
    time.sleep(0.5)
    cpu0 = {name: thread_cpu(pid) for name, pid in pids.items()}
    done0, start = load.done, time.perf_counter()
    spies = {name: subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                     "--rate", str(rate), "--format", "raw", "--threads",
                                     *(["--native"] if native else []), "-o", f"{workdir}/{name}.txt"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, pid in pids.items()}
    errors = {name: spy.communicate()[1] for name, spy in spies.items()}
    wall, steps = time.perf_counter() - start, load.done - done0
    cpu1 = {name: thread_cpu(pid) for name, pid in pids.items()}
    stop.set()
    worker.join()
    out = {}
    for name in pids:
        path = Path(f"{workdir}/{name}.txt")
        raw = path.read_text() if path.exists() else ""
        if not raw:
            print(f"py-spy on {name}: {errors[name].strip()[-300:]}", file=sys.stderr)
        stages, python_names, leaves = buckets(raw)
        out[name] = {"stages": stages, "threads": cpu_by_name(cpu0[name], cpu1[name], python_names),
                     "leaves": leaves}
    return {"processes": out, "wall_s": wall, "requests": steps * load.requests_per_step, "steps": steps}


def report(name: str, result: dict, rate: int) -> list[str]:
    """Markdown tables of one load: each stage's share of the samples and thread-ms per request,
    then each thread's CPU (from /proc) per request."""
    requests = max(1, result["requests"])
    lines = [f"## load `{name}`: {result['steps']} steps ({result['requests']} requests) in "
             f"{result['wall_s']:.1f} s while sampled ({1e3 * result['wall_s'] / requests:.2f} ms wall per request)", "",
             "| process | stage | share of samples | share of non-idle samples | thread-ms per request |",
             "|---|---|---|---|---|"]
    for proc, data in result["processes"].items():
        total = sum(data["stages"].values()) or 1
        busy = total - data["stages"].get("idle", 0) or 1
        for stage, count in data["stages"].most_common():
            share = "" if stage == "idle" else f"{100 * count / busy:.1f}%"
            lines.append(f"| {proc} | {stage} | {100 * count / total:.1f}% | {share} | "
                         f"{1e3 * count / rate / requests:.3f} |")
    lines += ["", "| process | stage: leaf frame (the most sampled, not idle) | thread-ms per request |", "|---|---|---|"]
    for proc, data in result["processes"].items():
        for leaf, count in data["leaves"].most_common(TOP_LEAVES):
            lines.append(f"| {proc} | {leaf} | {1e3 * count / rate / requests:.3f} |")
    lines += ["", "| process | thread (from /proc) | CPU ms per request | share of the process's CPU |",
              "|---|---|---|---|"]
    for proc, data in result["processes"].items():
        total = sum(data["threads"].values()) or 1
        for thread, cpu in sorted(data["threads"].items(), key=lambda kv: -kv[1]):
            if cpu > 0:
                lines.append(f"| {proc} | {thread} | {1e3 * cpu / requests:.3f} | {100 * cpu / total:.1f}% |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", nargs="+", default=["fetch", "adam", "small"], choices=["fetch", "adam", "small"])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--no-native", dest="native", action="store_false", help="Python frames only")
    p.add_argument("--out", default="bench/results/profile")
    args = p.parse_args(argv)
    init_local_ray()
    lines = [f"# Profile of the embedded cluster (2 shard actors, one client), py-spy at {args.rate} Hz, "
             f"{'with' if args.native else 'without'} native frames, {args.seconds:g} s per load", "",
             "Stage rules: `STAGES` in bench/profile_service.py. Thread-ms per request = samples / rate / requests, "
             "summed over threads (with native frames py-spy also samples threads blocked in a wait: \"idle\").", ""]
    import ray

    for name in args.loads:
        cluster = launch(ClusterConfig(num_shards=2, name=f"profile-{name}"))
        try:
            with cluster.client() as client, tempfile.TemporaryDirectory() as workdir:
                load = Load(name, client)
                pids = {"client": os.getpid()}
                pids.update({f"shard {i}": pid for i, pid in enumerate(ray.get([a.pid.remote() for a in cluster.actors]))})
                lines += report(name, profile(load, pids, args.seconds, args.rate, args.native, workdir), args.rate)
        finally:
            cluster.shutdown()
        print(f"done: {name}", file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    write_results(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
