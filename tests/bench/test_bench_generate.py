"""bench/bench_generate.py end to end at tiny size on shards in local processes: local and remote
tables generate the same tokens (the bench asserts it) at batch 1 and 16."""
import pytest

from tests.bench.test_bench_train_overhead import run_bench

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

pytestmark = pytest.mark.slow  # builds the tiny preset and generates 4 tokens x 2 batches x 2 tables


@pytest.mark.parametrize("device", DEVICES)
def test_local_and_remote_tables_generate_alike(device, corpus_dir, tmp_path):
    out = run_bench("bench_generate.py", ["--corpus", str(corpus_dir), "--new", "4", "--repeats", "1",
                                          "--device", device, "--cluster", "processes"], tmp_path)
    assert (out["device"], out["cluster"]) == (device, "processes")
    assert set(out["tokens_per_s"]) == {"local_b1", "remote_b1", "local_b16", "remote_b16"}
    assert all(v > 0 for v in out["tokens_per_s"].values())
