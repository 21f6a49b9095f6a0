"""bench/bench_hot_gather.py at tiny size: every read path timed against the index_select floor,
on the CPU here and on the GPU where there is one. Speeds are printed, not asserted; what is
asserted is that the paths gather what the arena holds and the summary has what it promises."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_summary_has_every_path_against_the_floor(device, capsys):
    from bench_hot_gather import main

    out = main(["--device", device, "--rows", "5000", "--batch", "512", "--iters", "2", "--json"])
    assert (out["device"], out["rows"], out["batch"], out["width"]) == (device, 5000, 512, 64)
    assert set(out["paths"]) == {"floor", "rows_tensor", "rows_at", "read"}
    assert out["paths"]["floor"]["vs_floor"] == 1.0
    for p in out["paths"].values():
        assert p["rows_per_s"] > 0 and p["gb_per_s"] == pytest.approx(p["rows_per_s"] * 64 * 4 / 1e9)
    assert '"paths"' in capsys.readouterr().out  # --json prints the object


@pytest.mark.parametrize("device", DEVICES)
def test_the_store_reads_the_rows_its_arena_holds(device):
    from bench_hot_gather import filled_store

    store = filled_store(3000, 8, device)
    ids = np.random.default_rng(0).integers(0, 3000, 100)
    slots = store.arena.lookup(ids)
    assert (slots >= 0).all()
    np.testing.assert_array_equal(store.read(ids), store.arena.rows_tensor(slots).cpu().numpy())
    assert store.arena.rows_tensor(slots[:1]).device.type == device


def test_cuda_without_a_gpu_is_refused(monkeypatch, capsys):
    from bench_hot_gather import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--rows", "10"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
