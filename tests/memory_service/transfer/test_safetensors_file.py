"""SafetensorsReader decodes every row dtype to float32 exactly and reads files laid out as the
format says; SafetensorsWriter writes chunks at their offsets into such a file."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from memory_service.transfer.safetensors_file import E4M3_TO_FLOAT32, SafetensorsReader, SafetensorsWriter
from tests.memory_service.transfer.files import write_by_hand


def test_e4m3_table_matches_torch():
    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(E4M3_TO_FLOAT32, expected)  # NaNs in the same places


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F8_E4M3"])
def test_rows_decode_exactly(tmp_path, dtype):
    source = torch.randn(37, 5)
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                   "F8_E4M3": torch.float8_e4m3fn}[dtype]
    stored = source.to(torch_dtype)
    raw = stored.view(torch.uint8 if dtype == "F8_E4M3" else {"F32": torch.int32}.get(dtype, torch.int16)).numpy()
    write_by_hand(tmp_path / "t.safetensors", {"emb": (dtype, raw)}, {"k": "v"})
    reader = SafetensorsReader(str(tmp_path / "t.safetensors"))
    assert reader.metadata == {"k": "v"} and reader.tensor("emb").shape == (37, 5)
    got = np.concatenate([reader.rows("emb", 0, 10), reader.rows("emb", 10, 37)])
    np.testing.assert_array_equal(got, stored.float().numpy())


def test_writer_chunks_read_back(tmp_path):
    path = str(tmp_path / "w.safetensors")
    rows = np.random.default_rng(0).standard_normal((100, 3)).astype(np.float32)
    last = np.arange(100, dtype=np.int64)
    writer = SafetensorsWriter(path, {"rows": ("F32", (100, 3)), "last": ("I64", (100,))}, {"a": "0000"})
    for start in (64, 0, 32):  # any order
        writer.write("rows", start, rows[start:start + 32 if start < 64 else 100])
        writer.write("last", start, last[start:start + 32 if start < 64 else 100])
    writer.set_metadata("a", "1234")
    writer.close()
    reader = SafetensorsReader(path)
    assert reader.metadata == {"a": "1234"}
    np.testing.assert_array_equal(reader.rows("rows", 0, 100), rows)
    np.testing.assert_array_equal(reader.stored("last", 0, 100), last)
    assert reader.data_start % 8 == 0


def test_bad_files_refused(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="too short"):
        SafetensorsReader(str(tmp_path / "short"))
    head = json.dumps({"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (tmp_path / "bad").write_bytes(struct.pack("<Q", len(head)) + head + bytes(64))
    with pytest.raises(ValueError, match="data_offsets"):
        SafetensorsReader(str(tmp_path / "bad"))
    write_by_hand(tmp_path / "ok", {"x": ("F32", np.zeros((2, 2), np.float32))})
    with pytest.raises(ValueError, match="no tensor 'y'"):
        SafetensorsReader(str(tmp_path / "ok")).tensor("y")
