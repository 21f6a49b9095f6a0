"""import_table against two real shards (one LMDB-backed): rows land bit-equal to the file, an
import stopped after k chunks or killed with SIGKILL continues where it stopped on a re-run
(redoing at most one chunk), a re-run of another import is refused, and bad input changes nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import TableNotFound
from memory_service.transfer import import_table
from memory_service.transfer.import_progress import ImportMismatch
from memory_service.transfer.safetensors_file import SafetensorsReader
from tests.memory_service.transfer.files import write_by_hand

ROWS, WIDTH, CHUNK = 1000, 8, 128


def config(name: str, **kw) -> TableConfig:
    return TableConfig(name, ROWS, WIDTH, optimizer=OptimizerConfig("sparse_adam", lr=0.01), **kw)


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory):
    """A [1000, 8] BF16 tensor "emb" (and an I64 one) written by hand; (path, rows as float32)."""
    path = str(tmp_path_factory.mktemp("files") / "model.safetensors")
    rows = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    write_by_hand(path, {"emb": ("BF16", rows.view(torch.int16).numpy()),
                         "ids": ("I64", np.zeros((ROWS, WIDTH), np.int64))})
    return path, rows.float().numpy()


def stored_rows(client, table: str) -> np.ndarray:
    return client.read_records(table, np.arange(ROWS)).rows


def test_import_is_bit_equal(client, bf16_file, tmp_path):
    path, expected = bf16_file
    result = import_table(client, path, "emb", "ns/whole", config("ns/whole"), chunk_rows=CHUNK,
                          progress_path=str(tmp_path / "p.json"))
    assert (result.chunks_written, result.chunks_skipped) == (8, 0)
    assert result.checksum.startswith(f"sha256x{CHUNK}:")
    np.testing.assert_array_equal(stored_rows(client, "ns/whole"), expected)
    np.testing.assert_array_equal(client.fetch({"ns/whole": np.arange(ROWS)})["ns/whole"].numpy(), expected)
    again = import_table(client, path, "emb", "ns/whole", config("ns/whole"), chunk_rows=CHUNK,
                         progress_path=str(tmp_path / "p.json"))
    assert (again.chunks_written, again.chunks_skipped, again.checksum) == (0, 8, result.checksum)


def test_stopped_import_resumes(client, bf16_file, tmp_path):
    path, expected = bf16_file
    kwargs = dict(cfg=config("ns/resumed"), chunk_rows=CHUNK, progress_path=str(tmp_path / "p.json"))
    first = import_table(client, path, "emb", "ns/resumed", max_chunks=3, **kwargs)
    assert (first.chunks_written, first.checksum) == (3, None)
    rest = import_table(client, path, "emb", "ns/resumed", **kwargs)
    assert (rest.chunks_written, rest.chunks_skipped) == (5, 3) and rest.checksum is not None
    np.testing.assert_array_equal(stored_rows(client, "ns/resumed"), expected)


_CHILD = r"""
import sys, time
from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.transfer import import_table
addresses, path, progress = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
def report(done, total, seconds):
    print(done, flush=True)
    time.sleep(0.2)  # so the parent's SIGKILL lands mid-import
with MemoryClient(addresses) as client:
    import_table(client, path, "emb", "ns/killed", TableConfig("ns/killed", 1000, 8,
                 optimizer=OptimizerConfig("sparse_adam", lr=0.01)), chunk_rows=128, progress_path=progress,
                 on_progress=report)
"""


def test_killed_import_resumes_redoing_at_most_one_chunk(client, served, bf16_file, tmp_path):
    path, expected = bf16_file
    progress = str(tmp_path / "p.json")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, ",".join(s.address for s in served[1]), path, progress],
                             stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    for _ in range(3):
        assert child.stdout.readline().strip()  # three chunks recorded
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    written_before = client.read_records("ns/killed", np.arange(0, ROWS, CHUNK)).last != -1  # per chunk
    result = import_table(client, path, "emb", "ns/killed", config("ns/killed"), chunk_rows=CHUNK,
                          progress_path=progress)
    assert result.chunks_skipped >= 3 and result.chunks_skipped + result.chunks_written == 8
    redone = int(written_before[result.chunks_skipped:].sum())  # chunks written twice
    assert redone <= 1
    np.testing.assert_array_equal(stored_rows(client, "ns/killed"), expected)


def test_rerun_of_another_import_is_refused(client, bf16_file, tmp_path):
    path, _ = bf16_file
    kwargs = dict(chunk_rows=CHUNK, progress_path=str(tmp_path / "p.json"))
    import_table(client, path, "emb", "ns/first", config("ns/first"), max_chunks=1, **kwargs)
    with pytest.raises(ImportMismatch, match="table"):
        import_table(client, path, "emb", "ns/second", config("ns/second"), **kwargs)
    with pytest.raises(ImportMismatch, match="chunk_rows"):
        import_table(client, path, "emb", "ns/first", config("ns/first"), chunk_rows=64,
                     progress_path=kwargs["progress_path"])


@pytest.mark.parametrize("tensor, cfg, match", [
    ("emb", TableConfig("ns/bad", ROWS + 1, WIDTH), "does not fit"),
    ("emb", TableConfig("ns/bad", ROWS, WIDTH + 1), "does not fit"),
    ("ids", TableConfig("ns/bad", ROWS, WIDTH), "I64"),
    ("missing", TableConfig("ns/bad", ROWS, WIDTH), "no tensor 'missing'"),
    ("emb", None, "not an export"),
])
def test_bad_input_changes_nothing(client, bf16_file, tmp_path, tensor, cfg, match):
    path, _ = bf16_file
    with pytest.raises(ValueError, match=match):
        import_table(client, path, tensor, "ns/bad", cfg, progress_path=str(tmp_path / "p.json"))
    with pytest.raises(TableNotFound):
        client.table("ns/bad")
    assert not os.path.exists(tmp_path / "p.json")


def test_width_of_an_existing_table_must_match(client, bf16_file, tmp_path):
    path, _ = bf16_file
    client.create_table(TableConfig("ns/narrow", ROWS, WIDTH // 2))
    with pytest.raises(ValueError, match="does not fit"):
        import_table(client, path, "emb", "ns/narrow", TableConfig("ns/narrow", ROWS, WIDTH // 2),
                     progress_path=str(tmp_path / "p.json"))


def test_non_finite_rows_are_refused_whole(client, tmp_path):
    rows = np.ones((ROWS, WIDTH), np.float32)
    rows[700, 3] = np.inf
    write_by_hand(tmp_path / "inf.safetensors", {"emb": ("F32", rows)})
    with pytest.raises(ValueError, match="row 700 is not finite"):
        import_table(client, str(tmp_path / "inf.safetensors"), "emb", "ns/inf", config("ns/inf"),
                     chunk_rows=CHUNK, progress_path=str(tmp_path / "p.json"))
    np.testing.assert_array_equal(client.read_records("ns/inf", np.arange(640, 768)).last, -1)  # chunk 5 unwritten
    assert SafetensorsReader(str(tmp_path / "inf.safetensors")).tensor("emb").shape == (ROWS, WIDTH)


@pytest.mark.parametrize("dtype, torch_dtype, view", [("F16", torch.float16, torch.int16),
                                                       ("F8_E4M3", torch.float8_e4m3fn, torch.uint8)])
def test_other_dtypes_import_bit_equal(client, tmp_path, dtype, torch_dtype, view):
    rows = (torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(2)) * 4).to(torch_dtype)
    write_by_hand(tmp_path / "m.safetensors", {"emb": (dtype, rows.view(view).numpy())})
    name = f"ns/{dtype.lower()}"
    import_table(client, str(tmp_path / "m.safetensors"), "emb", name, config(name), chunk_rows=CHUNK,
                 progress_path=str(tmp_path / "p.json"))
    np.testing.assert_array_equal(stored_rows(client, name), rows.float().numpy())


def test_a_file_rewritten_in_place_is_another_import(client, tmp_path):
    path = tmp_path / "m.safetensors"
    write_by_hand(path, {"emb": ("F32", np.zeros((ROWS, WIDTH), np.float32))})
    kwargs = dict(chunk_rows=CHUNK, progress_path=str(tmp_path / "p.json"))
    import_table(client, str(path), "emb", "ns/rewritten", config("ns/rewritten"), max_chunks=2, **kwargs)
    write_by_hand(path, {"emb": ("F32", np.ones((ROWS, WIDTH), np.float32))})  # same size and header
    os.utime(path, ns=(1, 1))
    with pytest.raises(ImportMismatch, match="file_mtime_ns"):
        import_table(client, str(path), "emb", "ns/rewritten", config("ns/rewritten"), **kwargs)
