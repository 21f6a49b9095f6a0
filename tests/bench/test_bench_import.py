"""bench/bench_import.py at small size (the suite's run of the acceptance): shard and importer
processes, an import killed with SIGKILL halfway and re-run redoing at most one chunk, every
fetched row bit-equal to the file, RssAnon within the stated bounds. Speeds are printed, not asserted."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_killed_import_resumes_and_lands_bit_equal(tmp_path):
    from bench_import import main

    out = main(["--rows", "8192", "--chunk-rows", "1024", "--runs", "1", "--out", str(tmp_path / "import.md")])
    assert out["checked"] == 8192 and out["redone"] <= 1 and out["skipped"] >= 4
    assert out["within_bounds"] and out["checksum"].startswith("sha256x1024:")
    assert "rows fetched bit-equal to the file | 8192 of 8192" in (tmp_path / "import.md").read_text()
