"""safetensors files read through a memory map and written in streamed chunks, never whole.

The format (huggingface/safetensors): 8 bytes little-endian u64 N, then N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} (offsets
relative to the byte after the header), then the tensors' bytes, row-major little-endian.

`SafetensorsReader` maps the file and hands out row ranges of a tensor decoded to float32 (F32,
BF16, F16, F8_E4M3: every such value is a float32 exactly) or as stored (I64, F64): pages come
from the page cache, so reading a 100 GiB table costs no anonymous memory. `SafetensorsWriter`
writes the header first (every tensor's shape is declared up front), sizes the file, then takes
row ranges of any tensor in any order at their offsets: a table is exported chunk by chunk.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

MAX_HEADER_BYTES = 100 << 20  # what the reference implementation accepts
STORED = {"F32": "<f4", "BF16": "<u2", "F16": "<f2", "F8_E4M3": "u1", "I64": "<i8", "F64": "<f8"}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F8_E4M3")  # the dtypes rows may come in


def _e4m3_table() -> np.ndarray:
    """float32 value of each float8 e4m3fn byte (256,): sign, 4 exponent bits (bias 7), 3
    mantissa bits, subnormals at exponent 0, NaN at S.1111.111 and no infinity (OCP FP8)."""
    table = np.empty(256, np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
        if exponent == 0xF and mantissa == 0x7:
            table[byte] = np.nan
        elif exponent == 0:
            table[byte] = sign * mantissa / 8 * 2.0 ** -6
        else:
            table[byte] = sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    return table


E4M3_TO_FLOAT32 = _e4m3_table()


def to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Values of a safetensors `dtype` as stored (`STORED[dtype]`) -> float32, exactly."""
    if dtype == "F32":
        return np.ascontiguousarray(stored, np.float32)
    if dtype == "BF16":  # bf16 is float32's upper half
        bits = stored.astype(np.uint32)
        bits <<= 16  # in place: one array of the chunk's size, not two
        return bits.view(np.float32)
    if dtype == "F16":
        return stored.astype(np.float32)
    if dtype == "F8_E4M3":
        return E4M3_TO_FLOAT32[stored]
    raise ValueError(f"dtype {dtype!r} is not a float dtype rows can come in ({', '.join(FLOAT_DTYPES)})")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: name, safetensors dtype, shape, byte range after the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsReader:
    """A safetensors file, its header parsed and checked, its data memory-mapped read-only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: {self.size} bytes is too short for a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if not 2 <= header_len <= min(MAX_HEADER_BYTES, self.size - 8):
                raise ValueError(f"{path}: header length {header_len} out of range [2, {min(MAX_HEADER_BYTES, self.size - 8)}]")
            self.header_bytes = f.read(header_len)
        try:
            header = json.loads(self.header_bytes)
        except ValueError as err:
            raise ValueError(f"{path}: the header is not JSON ({err})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.tensors = {name: self._info(name, entry) for name, entry in header.items()}
        self._data = np.memmap(path, np.uint8, "r", self.data_start) if self.size > self.data_start else np.empty(0, np.uint8)

    def _info(self, name: str, entry: dict) -> TensorInfo:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in STORED:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(STORED)}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(STORED[dtype]).itemsize
        if end - begin != nbytes or begin < 0 or self.data_start + end > self.size:
            raise ValueError(f"{self.path}: tensor {name!r} data_offsets [{begin}, {end}] do not hold shape "
                             f"{list(shape)} of {dtype} within the file's {self.size} bytes")
        return TensorInfo(name, dtype, shape, begin, end)

    def tensor(self, name: str) -> TensorInfo:
        """The tensor `name`, or ValueError naming the tensors the file has."""
        if name not in self.tensors:
            raise ValueError(f"{self.path}: no tensor {name!r}; it has {sorted(self.tensors)}")
        return self.tensors[name]

    def stored(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of tensor `name` as stored (a view of the memory map: no copy)."""
        info = self.tensor(name)
        row_values = int(np.prod(info.shape[1:], dtype=np.int64))
        itemsize = np.dtype(STORED[info.dtype]).itemsize
        begin = info.begin + start * row_values * itemsize
        raw = self._data[begin:info.begin + stop * row_values * itemsize]
        return raw.view(STORED[info.dtype]).reshape((stop - start, *info.shape[1:]))

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a float tensor as float32 (stop - start, ...), decoded exactly."""
        return to_float32(self.stored(name, start, stop), self.tensor(name).dtype)

    def close(self) -> None:
        self._data = None


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are declared up front ({name: (dtype, shape)}, in
    file order): the header is written and the file sized at once; `write` puts row ranges at
    their offsets. The file is written as PATH.partial and renamed to PATH by `close`, so a PATH
    that exists is whole."""

    def __init__(self, path: str, tensors: dict[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        self.path, self._offsets, offset = path, {}, 0
        for name, (dtype, shape) in tensors.items():
            if dtype not in STORED:
                raise ValueError(f"tensor {name!r}: dtype {dtype} not one of {', '.join(STORED)}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(STORED[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._offsets[name] = (offset, dtype, tuple(shape))
            offset += nbytes
        self._header = header
        raw = self._header_bytes()
        self._data_start = 8 + len(raw)
        self._file = open(path + ".partial", "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self._data_start + offset)

    def _header_bytes(self) -> bytes:
        raw = json.dumps(self._header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer pads

    def set_metadata(self, key: str, value: str) -> None:
        """Replaces metadata `key`'s value by one of the same length (a digest known only at the
        end, whose placeholder the header was written with)."""
        assert len(value) == len(self._header["__metadata__"][key]), "metadata values are replaced in place"
        self._header["__metadata__"][key] = value
        os.pwrite(self._file.fileno(), self._header_bytes(), 8)

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Rows [start, start + len(values)) of tensor `name`, given in its stored dtype."""
        offset, dtype, shape = self._offsets[name]
        values = np.ascontiguousarray(values, STORED[dtype])
        if values.shape[1:] != shape[1:] or not 0 <= start <= start + len(values) <= (shape[0] if shape else 1):
            raise ValueError(f"tensor {name!r} of shape {list(shape)}: cannot take rows {start}.. of shape "
                             f"{list(values.shape)}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * values.itemsize
        os.pwrite(self._file.fileno(), values.tobytes(), self._data_start + offset + start * row_bytes)

    def close(self) -> None:
        """Flushes the file to disk and gives it its name."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.path + ".partial", self.path)
