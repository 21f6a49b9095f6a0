"""bench/bench_tiers.py's service section on a tiny trace: real shard actors on the session's Ray,
real gRPC, a real migrator. It must find hot-shard hits in the shards' counters, and report the
figures its summary promises; speeds are printed by the benchmark, not asserted."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.slow  # loads the corpus and starts two tables clusters (~30 s)


def test_service_section_reads_hot_hits_from_the_shards(ray_session):
    from bench_tiers import load_trace, parse_args, service_section

    args = parse_args(["--service-split-fraction", "0.02", "--service-step-s", "0.1"])
    trace, sizes = load_trace(args, args.service_split_fraction)
    result, lines = service_section(args, trace, sizes)

    for key in ("service_hot_hit_rate", "service_offline_hit_rate", "service_fetch_rows_per_s",
                "dram_fetch_rows_per_s", "service_vs_dram"):
        assert key in result, key
    hot, dram = result["service"]["hot_cold"], result["service"]["dram"]
    assert hot["hits"]["hot"] > 0 and hot["migration"]["promoted"] > 0, hot  # rows moved and were read there
    assert 0 < result["service_hot_hit_rate"] <= 1 and 0 < result["service_offline_hit_rate"] <= 1
    assert dram["reads"] == {"cold": hot["rows"]} and "hot" not in dram["hits"]  # every read once, no hot shard
    assert result["service_vs_dram"] == hot["rows_per_s"] / dram["rows_per_s"]
    assert any("hot/cold service / all-DRAM" in line for line in lines)
