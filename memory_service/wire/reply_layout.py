"""ReplyLayout: where one fetch's rows land, on the client.

Every table's distinct rows sit side by side, each table's in its route's order (shard 0's
slice, then shard 1's, ...), so once every reply is in, one gather per table puts the rows in the
caller's order. When the rows are large enough to pay for it and a shard shares this host, the
layout is a shared-memory reply file (memory_service/wire/reply_files.py) that the shards write
into; rows that came in a gRPC reply are copied in by `place`.
"""
from __future__ import annotations

import numpy as np

from memory_service.config import TableConfig
from memory_service.errors import InvalidArgument
from memory_service.wire import reply_files
from memory_service.wire.codec import word_dtype


class ReplyLayout:
    """The rows of `tables` {table: (distinct rows u, config)}, in a buffer of `replies` when
    `shared` (some shard of the fetch may write through shared memory) and they come to at
    least reply_files.MIN_REPLY_BYTES, else in arrays of their own. `release` hands the buffer
    back once the rows were read."""

    def __init__(self, tables: dict[str, tuple[int, TableConfig]], replies: reply_files.ReplyBufferPool | None,
                 shared: bool):
        self.configs = {name: cfg for name, (_, cfg) in tables.items()}
        self.bases, end = {}, 0  # table -> byte offset of its rows
        for name, (num, cfg) in tables.items():
            self.bases[name] = end
            end = reply_files.aligned(end + num * self.row_bytes(name))
        self.replies = replies
        shared = replies is not None and shared and end >= reply_files.MIN_REPLY_BYTES
        self.buffer = replies.acquire(end) if shared else None
        self.rows = {name: self._view(name, num) for name, (num, _) in tables.items()}  # (u, width) each

    @property
    def path(self) -> str | None:
        """The shared-memory file shards write into, or None: rows come in the replies."""
        return None if self.buffer is None else self.buffer.path

    def row_bytes(self, name: str) -> int:
        return self.configs[name].wire_row_bytes

    def offset(self, name: str, start: int) -> int:
        """Byte offset in the file of table `name`'s distinct row `start`."""
        return self.bases[name] + start * self.row_bytes(name)

    def _view(self, name: str, num: int) -> np.ndarray:
        """Where a table's distinct rows land: (num, width) in the table's wire dtype, or a
        quantized table's packed rows (num, stored_width) float32 words."""
        cfg = self.configs[name]
        dtype = np.uint16 if word_dtype(cfg) == "bfloat16" else np.float32
        if self.buffer is None:
            return np.empty((num, cfg.stored_width), dtype)
        return self.buffer.view(self.bases[name], num * self.row_bytes(name)).view(dtype).reshape(num, cfg.stored_width)

    def place(self, chunk: list[tuple[str, int, int]], response) -> None:
        """Copy the rows of a FetchResponse to request `chunk` [(table, start, stop)] into their
        slices, after checking each table's byte count."""
        for (name, start, stop), rows in zip(chunk, response.tables):
            expected = (stop - start) * self.row_bytes(name)
            if len(rows.rows) != expected:
                raise InvalidArgument(f"table {name!r}: shard replied {len(rows.rows)} bytes, expected {expected}")
            target = self.rows[name]
            target[start:stop] = np.frombuffer(rows.rows, target.dtype).reshape(-1, target.shape[1])

    def is_bf16(self, name: str) -> bool:
        """Whether table `name`'s rows sit here as bf16 bit patterns (uint16), to be widened."""
        return word_dtype(self.configs[name]) == "bfloat16"

    def release(self) -> None:
        """Hand the shared-memory buffer back to its pool (the rows' views must be done with)."""
        if self.buffer is not None:
            self.replies.release(self.buffer)
            self.buffer = None
