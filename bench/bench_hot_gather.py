"""Gather rate of the device tier's read path (a hot shard's arena on a GPU) against `torch.index_select` on the same device (issue 5).

A hot shard on a GPU keeps its rows in a `DeviceTier` arena there (memory_service/storage/tiers/device.py) and
serves a fetch by finding the ids' slots on the host (SlotIndex), gathering the rows on the device
and copying them to the host for the reply. An arena of `--rows` rows (width 64 fp32; no optimizer
state, which a read never touches) is read in batches of `--batch` random rows, four ways:

    floor        torch.index_select on a (rows, width) tensor, the index already on the device
    rows_tensor  DeviceTier.rows_tensor(slots): host slots copied over, gathered on the device
    rows_at      DeviceTier.rows_at(slots): the same, rows copied back to a host numpy array
    read         TableStore.read(ids): slots looked up on the host, then rows_at (a fetch's path)

Prints rows/s and GB/s (rows gathered x width x 4 bytes) of each and its share of the floor;
`--json`: one object with the same per path. Runs on the CPU too (`--device cpu`, small `--rows`).

    python bench/bench_hot_gather.py [--device cuda] [--rows 4194304] [--batch 16384] [--json]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.storage.store import TableStore
from memory_service.storage.tiers.device import DeviceTier, default_device

FILL_CHUNK = 1 << 20  # rows appended per call while filling (bounds the host copy)


def filled_store(rows: int, width: int, device: str) -> TableStore:
    """A table's store whose hot arena on `device` holds rows 0..rows-1 (random values, random slots)."""
    cfg = TableConfig("gather", num_rows=rows, width=width, optimizer=OptimizerConfig("sgd", lr=0.1))
    tier = DeviceTier(width, 0, max_rows=rows, device=device)
    rng = np.random.default_rng(0)
    ids = rng.permutation(rows).astype(np.int64)  # slot s holds a random id: reads hit random slots
    for start in range(0, rows, FILL_CHUNK):
        chunk = ids[start:start + FILL_CHUNK]
        tier.append(chunk, rng.random((len(chunk), width), dtype=np.float32),
                    np.empty((len(chunk), 0), np.float32), np.zeros(len(chunk), np.int64))
    return TableStore(cfg, arena=tier)


def timed(fn: Callable[[int], object], iters: int, device: torch.device) -> float:
    """Mean seconds per call of fn(i) over `iters` calls after one warm-up call, the device
    synchronised before and after (a GPU runs the gathers asynchronously)."""
    fn(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(iters):
        fn(i)
    sync()
    return (time.perf_counter() - start) / iters


def measure(rows: int, batch: int, width: int, iters: int, device: str) -> dict:
    """{path: seconds per batch} of the four read paths, on the same arena size and device."""
    store = filled_store(rows, width, device)
    tier, dev = store.arena, torch.device(device)
    rng = np.random.default_rng(1)
    slots = [rng.integers(0, rows, batch) for _ in range(iters)]  # (batch,) each, host
    ids = [tier.ids_at(s) for s in slots]  # the ids those slots hold
    table = torch.rand((rows, width), device=dev)  # the floor's same-sized plain tensor
    index = [torch.from_numpy(s).to(dev) for s in slots]
    return {
        "floor": timed(lambda i: torch.index_select(table, 0, index[i]), iters, dev),
        "rows_tensor": timed(lambda i: tier.rows_tensor(slots[i]), iters, dev),
        "rows_at": timed(lambda i: tier.rows_at(slots[i]), iters, dev),
        "read": timed(lambda i: store.read(ids[i]), iters, dev),
    }


def summary(seconds: dict[str, float], rows: int, batch: int, width: int, device: str) -> dict:
    """rows/s, GB/s and share of the floor of each path, with what was measured."""
    paths = {name: {"rows_per_s": batch / s, "gb_per_s": batch * width * 4 / s / 1e9,
                    "vs_floor": seconds["floor"] / s}
             for name, s in seconds.items()}
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device, "device_name": name, "rows": rows, "batch": batch, "width": width,
            "paths": paths}


def table_text(out: dict) -> str:
    lines = [f"device tier gather on {out['device_name']}: {out['rows']:,} rows x {out['width']} fp32, "
             f"batches of {out['batch']:,} random rows",
             "       path      M rows/s      GB/s   vs floor"]
    for name, p in out["paths"].items():
        lines.append(f"{name:>11} {p['rows_per_s'] / 1e6:13.1f} {p['gb_per_s']:9.2f} {p['vs_floor']:10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=default_device().type, choices=("cpu", "cuda"))
    p.add_argument("--rows", type=int, default=4 << 20, help="rows in the arena")
    p.add_argument("--batch", type=int, default=16384, help="random rows per gather")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--iters", type=int, default=50, help="timed batches per path")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for name in ("rows", "batch", "width", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here")
    seconds = measure(args.rows, args.batch, args.width, args.iters, args.device)
    out = summary(seconds, args.rows, args.batch, args.width, args.device)
    print(json.dumps(out) if args.json else table_text(out))
    return out


if __name__ == "__main__":
    main()
