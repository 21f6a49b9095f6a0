"""bench/profile_trace.py: a traced training run through the table service shows its fetches,
waits and pushes as ranges (recorded on every thread), and the summary totals them."""
import gzip
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from trainer.data import Corpus
from trainer.train import ServiceOptions, train

from tests.trainer.test_train import small_train_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from shard_processes import start_processes  # noqa: E402
from profile_trace import SKIPPED_STEPS, WARMUP_STEPS, step_profiler, summarize, summary_line  # noqa: E402


def event(name: str, dur_us: float, cat: str = "user_annotation") -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": 0, "dur": dur_us, "pid": 1, "tid": 1}


def test_summary_totals_cpu_ranges_and_skips_their_gpu_mirrors(tmp_path):
    events = [event("ProfilerStep#3", 100_000), event("ProfilerStep#4", 120_000),
              event("engram.fetch", 40_000), event("engram.fetch", 50_000), event("engram.wait", 9_000),
              event("engram.push", 7_000), event("engram.wait", 1_000_000, cat="gpu_user_annotation"),
              event("aten::mm", 5_000, cat="cpu_op")]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(path)
    assert (s["steps"], s["fetches"], s["waits"], s["pushes"]) == (2, 2, 1, 1)
    assert (s["step_ms"], s["fetch_ms"], s["wait_ms"], s["push_ms"]) == (220.0, 90.0, 9.0, 7.0)
    assert s["hidden"] == pytest.approx(0.9)
    assert "90.0% of fetch time hidden" in summary_line(s)


def test_no_fetch_ranges_means_no_hidden_share(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [event("ProfilerStep#2", 1000)]}))
    s = summarize(path)
    assert s["hidden"] is None and s["steps"] == 1 and "n/a" in summary_line(s)


@pytest.mark.slow
def test_a_traced_run_through_the_service_shows_fetches_waits_and_pushes(corpus_dir, tmp_path):
    steps = 3
    cfg = replace(small_train_config(corpus_dir, tmp_path), steps=SKIPPED_STEPS + WARMUP_STEPS + steps + 1,
                  warmup_steps=1, threads=1)
    corpus = Corpus.load(cfg.corpus)
    path = tmp_path / "trace" / "trace.json.gz"
    with start_processes(num_shards=2, num_hot=0, niceness=0) as shards, shards.client() as client:
        with step_profiler(path, "cpu", steps) as prof:
            train(cfg, corpus, client=client, service=ServiceOptions(prefix="traced"), on_step=lambda s: prof.step())
    s = summarize(path)
    assert s["steps"] == steps
    # one fetch per step (every Engram layer in one), a wait per layer read, a push per layer
    assert s["fetches"] >= steps and s["waits"] >= steps and s["pushes"] >= steps, s
    assert s["fetch_ms"] > 0 and s["hidden"] is not None and s["hidden"] <= 1
