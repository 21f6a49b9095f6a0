"""Import of a safetensors table into LMDB-backed shards: throughput against reading the file alone,
bounded anonymous memory, and an import killed halfway that resumes without duplicate work.

Setup writes a synthetic file of `--rows` x 160 BF16 (4M rows: ~1.3 GB), streamed chunk by chunk.
Two cold shards run as processes of their own (the real `Shard` with `StorageConfig(path=...,
dram_budget_bytes=128 MiB)` behind its gRPC servicer on 127.0.0.1), and the importer too
(`memory_service.transfer.import_table` in a subprocess), so each one's RssAnon (/proc/<pid>/status)
is its own; the parent samples them every 0.1 s and keeps the peaks. The table: float32 rows,
optimizer sgd (no optimizer state: a served table), rows only.

1. floor: reading the file alone, chunk by chunk from its memory map, decoded to float32 (what an
   import cannot avoid), the file in the page cache as it is for the imports (just written).
2. an import killed with SIGKILL half a chunk's time after half its chunks are recorded (the next
   chunk in flight), then re-run: it must end with
   every row bit-equal to the file, with at most one chunk written twice (chunks past the recorded
   ones that already held rows when the re-run started).
3. every row fetched (MemoryClient.fetch, float32) compared bit for bit with the file.
4. `--runs` timed imports into fresh tables: rows/s (median), and as a fraction of the floor.
   The import's read-back verification (checksum) is timed apart.

    python bench/bench_import.py [--rows 4194304] [--runs 3] [--chunk-rows 65536] [--out bench/results/import.md]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, REPO_ROOT)
from memory_service.server.shard_process import COLD_SHARD_ENV  # noqa: E402
from memory_service.transfer.safetensors_file import SafetensorsReader, SafetensorsWriter  # noqa: E402

WIDTH, DRAM_BUDGET = 160, 128 << 20
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}

_SHARD = r"""
import json, os, sys
from memory_service.config import StorageConfig
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
shard = Shard(int(sys.argv[1]), 2, StorageConfig(path=sys.argv[2], dram_budget_bytes=int(sys.argv[3])))
server = serve(shard)
print(json.dumps({"target": server.address}), flush=True)
sys.stdin.read()
server.stop(None)
shard.close()
"""

_IMPORTER = r"""
import json, sys, time
from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.transfer import import_table
targets, path, table, rows, width, chunk_rows, progress = sys.argv[1:8]
cfg = TableConfig(table, int(rows), int(width), optimizer=OptimizerConfig("sgd", lr=0.01))
def report(done, total, seconds):
    print(json.dumps({"done": done}), flush=True)
with MemoryClient(targets.split(","), shared_memory=False) as client:
    r = import_table(client, path, "emb", table, cfg, chunk_rows=int(chunk_rows), progress_path=progress,
                     on_progress=report)
print(json.dumps({"seconds": r.seconds, "verify_seconds": r.verify_seconds, "written": r.chunks_written, "skipped": r.chunks_skipped,
                  "checksum": r.checksum}), flush=True)
"""


def rss_anon(pid: int) -> int:
    """Anonymous resident bytes of process `pid` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """Samples the RssAnon of some processes every 0.1 s and keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids, self.peaks = dict(pids), {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.peaks.setdefault(name, 0)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pid in list(self.pids.items()):
                self.peaks[name] = max(self.peaks[name], rss_anon(pid))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def write_file(path: str, rows: int, chunk_rows: int) -> None:
    """rows x WIDTH BF16 values of a seeded normal, written chunk by chunk (never whole)."""
    import torch

    writer = SafetensorsWriter(path, {"emb": ("BF16", (rows, WIDTH))}, {"synthetic": "bench_import"})
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        values = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(start)).to(torch.bfloat16)
        writer.write("emb", start, values.view(torch.int16).numpy().view(np.uint16))
    writer.close()


def read_file_alone(path: str, chunk_rows: int) -> float:
    """Seconds to read every chunk of the file's rows from its memory map, decoded to float32."""
    reader = SafetensorsReader(path)
    rows = reader.tensor("emb").shape[0]
    started = time.perf_counter()
    total = 0.0
    for start in range(0, rows, chunk_rows):
        total += float(reader.rows("emb", start, min(start + chunk_rows, rows))[0, 0])  # touch the result
    return time.perf_counter() - started


def start_shards(root: str) -> tuple[list[subprocess.Popen], list[str]]:
    procs, targets = [], []
    for shard_id in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _SHARD, str(shard_id), os.path.join(root, f"shard{shard_id}"),
                                 str(DRAM_BUDGET)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**ENV, **COLD_SHARD_ENV})
        procs.append(proc)
        targets.append(json.loads(proc.stdout.readline())["target"])
    return procs, targets


def run_importer(targets: list[str], path: str, table: str, rows: int, chunk_rows: int, progress: str,
                 peaks: PeakRss, kill_after_chunks: int | None = None) -> dict:
    """One importer process; killed with SIGKILL once it recorded `kill_after_chunks` chunks."""
    proc = subprocess.Popen([sys.executable, "-c", _IMPORTER, ",".join(targets), path, table, str(rows), str(WIDTH),
                             str(chunk_rows), progress], stdout=subprocess.PIPE, text=True, env=ENV)
    peaks.add("importer", proc.pid)
    recorded, started = 0, time.perf_counter()
    for line in proc.stdout:
        message = json.loads(line)
        if "done" in message:
            recorded += 1
            if kill_after_chunks is not None and recorded >= kill_after_chunks:
                time.sleep((time.perf_counter() - started) / recorded / 2)  # the next chunk mid-flight
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"killed_after": recorded}
        else:
            proc.wait()
            return message
    raise RuntimeError(f"the importer exited with {proc.wait()} before finishing")


def written_chunks(client, table: str, rows: int, chunk_rows: int) -> np.ndarray:
    """Per chunk: whether its first row is stored (a rows-only import gives it last step 0)."""
    return client.read_records(table, np.arange(0, rows, chunk_rows)).last != -1


def check_fetched(client, table: str, path: str, chunk_rows: int) -> int:
    """Fetches every row and compares it bit for bit with the file; returns the rows compared."""
    reader = SafetensorsReader(path)
    rows = reader.tensor("emb").shape[0]
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        got = client.fetch({table: np.arange(start, stop)})[table].numpy()
        if not np.array_equal(got.view(np.uint32), reader.rows("emb", start, stop).view(np.uint32)):
            raise AssertionError(f"rows {start}..{stop} fetched differ from the file")
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Runs the bench; returns its figures (tests/bench/test_bench_import.py reads them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4 << 20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunk-rows", type=int, default=65536)
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "import.md"))
    args = p.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="bench-import-")
    path = os.path.join(root, "table.safetensors")
    procs: list[subprocess.Popen] = []
    try:
        started = time.perf_counter()
        write_file(path, args.rows, args.chunk_rows)
        print(f"wrote {path}: {os.path.getsize(path) / 2**30:.2f} GiB in {time.perf_counter() - started:.1f} s", flush=True)
        floor_s = statistics.median(read_file_alone(path, args.chunk_rows) for _ in range(3))
        procs, targets = start_shards(root)
        peaks = PeakRss({f"shard{i}": proc.pid for i, proc in enumerate(procs)})
        from memory_service.client import MemoryClient

        num_chunks = -(-args.rows // args.chunk_rows)
        with MemoryClient(targets, shared_memory=False) as client:
            progress = os.path.join(root, "resumed.progress.json")
            killed = run_importer(targets, path, "bench/resumed", args.rows, args.chunk_rows, progress, peaks,
                                  kill_after_chunks=num_chunks // 2)
            before = written_chunks(client, "bench/resumed", args.rows, args.chunk_rows)
            resumed = run_importer(targets, path, "bench/resumed", args.rows, args.chunk_rows, progress, peaks)
            redone = int(before[resumed["skipped"]:].sum())
            checked = check_fetched(client, "bench/resumed", path, args.chunk_rows)
            print(f"killed once {killed['killed_after']}+ chunks were recorded; the re-run skipped {resumed['skipped']}, wrote "
                  f"{resumed['written']}, redid {redone}; {checked} fetched rows bit-equal", flush=True)
            timed = []
            for run in range(args.runs):
                result = run_importer(targets, path, f"bench/run{run}", args.rows, args.chunk_rows,
                                      os.path.join(root, f"run{run}.progress.json"), peaks)
                timed.append(result)
                print(f"run {run}: {result['seconds'] - result['verify_seconds']:.1f} s import, "
                      f"{result['verify_seconds']:.1f} s read-back check", flush=True)
                client.drop_table(f"bench/run{run}")  # frees the shards' disk for the next run
        rss = peaks.stop()
        return report(args, path, floor_s, killed, resumed, redone, checked, timed, rss)
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(60)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


IMPORTER_BOUND, SHARD_BOUND = 768 << 20, DRAM_BUDGET + (640 << 20)  # bytes of RssAnon, whatever --rows


def report(args, path: str, floor_s: float, killed: dict, resumed: dict, redone: int, checked: int,
           timed: list[dict], rss: dict[str, int]) -> dict:
    """Prints the figures, writes them to `args.out` as markdown and returns them."""
    import_s = statistics.median(r["seconds"] - r["verify_seconds"] for r in timed)
    verify_s = statistics.median(r["verify_seconds"] for r in timed)
    rate, floor_rate = args.rows / import_s, args.rows / floor_s
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    within = rss["importer"] <= IMPORTER_BOUND and max(rss["shard0"], rss["shard1"]) <= SHARD_BOUND
    lines = [
        "# Import of a safetensors table into LMDB-backed shards (bench/bench_import.py)",
        "",
        f"`python bench/bench_import.py --rows {args.rows} --runs {args.runs} --chunk-rows {args.chunk_rows}`: "
        f"{args.rows} rows x {WIDTH} BF16 ({os.path.getsize(path) / 2**30:.2f} GiB), 2 cold shard processes with "
        f"LMDB and dram_budget_bytes {mib(DRAM_BUDGET)} each, table float32 rows with sgd (no optimizer state), "
        f"the importer a process of its own. {os.cpu_count()} cores shared by all processes (load average "
        f"{os.getloadavg()[2]:.1f} over the last 15 minutes, other work included).",
        "",
        "| figure | value | against |",
        "|---|---|---|",
        f"| import throughput (median of {len(timed)}) | {rate:,.0f} rows/s ({import_s:.1f} s) | "
        f"reading the file alone: {floor_rate:,.0f} rows/s ({floor_s:.2f} s, median of 3): "
        f"**{rate / floor_rate:.3f}** of it |",
        f"| read-back check (checksum, median) | {args.rows / verify_s:,.0f} rows/s ({verify_s:.1f} s) | |",
        f"| importer RssAnon peak | {mib(rss['importer'])} | bound {mib(IMPORTER_BOUND)} |",
        f"| shard RssAnon peaks | {mib(rss['shard0'])}, {mib(rss['shard1'])} | bound {mib(SHARD_BOUND)} "
        f"(DRAM budget + 640 MiB) |",
        f"| import killed (SIGKILL) | mid-chunk, {resumed['skipped']} of {-(-args.rows // args.chunk_rows)} chunks "
        f"recorded | |",
        f"| re-run | skipped {resumed['skipped']}, wrote {resumed['written']}, **redid {redone}** chunk(s) | "
        f"at most 1 |",
        f"| rows fetched bit-equal to the file | {checked} of {args.rows} | all |",
        f"| checksum | `{resumed['checksum']}` | |",
        "",
        f"Within the memory bounds: {'yes' if within else 'NO'}. The floor reads the file from the page cache "
        f"(just written), as the imports do.",
        "",
        "Why the gap to the floor: the floor only maps and decodes the file; an import also sends each row over "
        "gRPC, and each shard checks it, logs it in its write-ahead log (durable before it answers) and writes it "
        "to LMDB, the importer and both shards sharing the machine's cores.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return {"rows_per_s": rate, "floor_rows_per_s": floor_rate, "redone": redone, "skipped": resumed["skipped"],
            "checked": checked, "rss": rss, "within_bounds": within, "checksum": resumed["checksum"]}


if __name__ == "__main__":
    main()
