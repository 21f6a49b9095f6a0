"""`engram demo`, the main job, end to end at small sizes: trains through the service next to the
baseline, prints both held-out losses, a sample read from the service and the shards' counters,
writes the checkpoint and the loss plot."""
import pytest

from trainer.cli import main


pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(ray_session, corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the corpus cache goes under the test's folder
    out = tmp_path / "demo"
    assert main(["demo", "--corpus", str(corpus_dir), "--steps", "4", "--batch-size", "4", "--context", "32",
                 "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss after 4 steps: Engram" in printed and "baseline" in printed
    assert "rows read from the service" in printed
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("shard   step"))
    shard_rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[:2] for r in shard_rows] == [["cold", "0"], ["cold", "1"], ["hot", "0"]]  # the embedded default
    assert all(int(r[2]) == 4 for r in shard_rows)  # every shard took the 4 steps
    assert (out / "model.pt").exists()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
