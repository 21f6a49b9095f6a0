"""The trainer's process when it shares its host's cores with the table service's shards (the
embedded cluster of `engram demo`, the benches).

libgomp, torch's OpenMP runtime on the CPU, keeps its worker threads spinning for 300,000
iterations after each parallel region before they sleep. A training step runs hundreds of small
parallel regions, so the workers hold both cores nearly all step, and the shards (at the lowest
CPU priority) get the cores only late: their fetch and push work lands on the step's critical
path. A spin of 10,000 iterations keeps torch's own speed (16 local steps of the demo's model,
two runs each: 809-825 ms/step at 3,000, 772-818 at 30,000, 791-825 at the default; 0, i.e.
OMP_WAIT_POLICY=PASSIVE, 836-888) and gives the shards the gaps: bench/results/train_overhead.md.
libgomp reads it once, when torch loads, so `apply()` must run before torch is imported.
"""
from __future__ import annotations

import os
import sys

TRAINER_ENV = {"GOMP_SPINCOUNT": "10000"}


def apply() -> None:
    """Sets TRAINER_ENV where the environment does not say otherwise; warns if torch is loaded
    already (then it takes effect only in processes started from here on)."""
    for key, value in TRAINER_ENV.items():
        os.environ.setdefault(key, value)
    if "torch" in sys.modules:
        print("trainer.colocation.apply(): torch was imported first; GOMP_SPINCOUNT applies to child "
              "processes only", file=sys.stderr)
