"""Flushes that do not stop a cold shard (issue 22): a flush writes its dirty rows to LMDB in
chunks, the shard's lock released between them, so fetches are served while it runs; a row changed
meanwhile stays dirty, and a shard killed (SIGKILL) in the middle of a flush comes back exact from
LMDB and its write-ahead log. Real LMDB, real files, a real gRPC server over loopback."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, StorageConfig, TableConfig
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

ROOT = Path(__file__).resolve().parents[3]
ROWS, WIDTH, DIRTY = 250_000, 16, 6000


def open_shard(path=None, width: int = WIDTH) -> Shard:
    """A cold shard (all-DRAM without `path`) whose DRAM holds every row the tests write: pushed
    rows stay resident, so a second push leaves them dirty."""
    storage = None if path is None else StorageConfig(path=str(path), dram_budget_bytes=256 << 20,
                                                       flush_interval_s=3600.0, flush_wal_bytes=1 << 40)
    shard = Shard(0, 1, storage)
    shard.create_table(TableConfig("t", ROWS, width, init_scale=0.1, seed=3, optimizer=OptimizerConfig("sparse_adam")))
    return shard


def push_step(shard: Shard, step: int, width: int = WIDTH, num: int = DIRTY) -> None:
    """Step `step`'s push: for steps 1 and 2 the same `num` rows (written, then dirty); after, a
    mix of those and new rows."""
    rng = np.random.default_rng(step)
    ids = np.arange(0, 7 * num, 7) if step <= 2 else np.unique(np.r_[rng.choice(7 * num, num // 2), rng.choice(ROWS, 500)])
    grads = rng.standard_normal((len(ids), width)).astype(np.float32)
    shard.push("trainer", {"t": TablePush(step, ids, grads)}, request_seq=step)


KILLED_MID_FLUSH = """
import sys, threading, time
sys.path[:0] = [{tests!r}, {root!r}]
import memory_service.shard.shard as shard_module
from test_flush import open_shard, push_step

shard_module.FLUSH_CHUNK_ROWS = 1000
pauses, pushed = [0], threading.Event()

class Pauses:  # the flush's pause between chunks (outside the lock)
    @staticmethod
    def sleep(seconds):
        pauses[0] += 1
        if pauses[0] == 3:  # two chunks written: a push changes rows flushed and rows still dirty
            threading.Thread(target=lambda: (push_step(shard, 3), pushed.set())).start()
            pushed.wait()
        if pauses[0] == 5:
            print("mid-flush", flush=True)
            time.sleep(600)  # killed here

shard = open_shard({path!r})
push_step(shard, 1)
push_step(shard, 2)
assert shard.usage()[0].tiers[0].dirty_rows >= {dirty}, shard.usage()
shard_module.time = Pauses
shard.flush()
"""


def test_a_shard_killed_mid_flush_comes_back_exact(tmp_path):
    """A child pushes steps 1 and 2 (6000 dirty rows), starts a flush in 1000-row chunks, pushes
    step 3 after two chunks (between chunks: the push is served during the flush) and is killed
    with SIGKILL two chunks later. Reopened, the shard equals one that took the same pushes
    without a crash, bit for bit, and it remembers push 3 (a re-send is not applied again)."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_FLUSH.format(
        tests=str(ROOT / "tests" / "memory_service" / "shard"), root=str(ROOT), path=str(tmp_path), dirty=DIRTY)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "mid-flush\n"
    finally:
        child.kill()
        child.wait()
    want = open_shard()
    for step in (1, 2, 3):
        push_step(want, step)
    got = open_shard(tmp_path)
    try:
        assert got.journal.replayed > 0  # the interrupted flush had not completed its checkpoint
        g, w = got.table_state("t"), want.table_state("t")
        for field in w:
            assert np.array_equal(g[field], w[field], equal_nan=True), field
        assert got.journal.applied("trainer", 3) is not None
        # the reopened shard's own flush completes, and a restart after it replays nothing
        got.flush()
    finally:
        got.close()
    again = open_shard(tmp_path)
    try:
        assert again.journal.replayed == 0
        assert np.array_equal(again.table_state("t")["rows"], want.table_state("t")["rows"])
    finally:
        again.close()


def test_fetches_are_served_while_a_large_dirty_set_is_flushed(tmp_path):
    """32k dirty rows of width 64 flushed while a client fetches over gRPC in a loop: fetches
    start and complete inside the flush (before, the flush held the shard's lock throughout and
    none could), and every dirty row is in LMDB at the end."""
    width = 64
    shard = open_shard(tmp_path, width)
    for step in (1, 2):
        push_step(shard, step, width, num=32768)
    server = serve(shard, host="127.0.0.1", port=0)
    client = MemoryClient([server.address], shared_memory=False)
    try:
        assert shard.usage()[0].tiers[0].dirty_rows >= 32768
        window: dict[str, float] = {}

        def flush() -> None:
            window["start"] = time.monotonic()
            shard.flush()
            window["end"] = time.monotonic()

        flusher = threading.Thread(target=flush)
        rng = np.random.default_rng(0)
        samples = []
        flusher.start()
        while flusher.is_alive():
            ids = np.unique(rng.choice(7 * 32768, 256))
            start = time.monotonic()
            client.fetch({"t": ids})
            samples.append((start, time.monotonic()))
        flusher.join()
        inside = [(s, e) for s, e in samples if s >= window["start"] and e <= window["end"]]
        longest = max(e - s for s, e in samples)
        flush_s = window["end"] - window["start"]
        print(f"flush {flush_s * 1e3:.0f} ms; {len(inside)} fetches inside it; longest fetch {longest * 1e3:.0f} ms")
        assert len(inside) >= 1, (f"no fetch completed during a {flush_s * 1e3:.0f} ms flush (longest fetch "
                                  f"{longest * 1e3:.0f} ms): the flush holds the shard")
        assert shard.usage()[0].tiers[0].dirty_rows == 0
    finally:
        client.close()
        server.stop(1.0)
        shard.close()
