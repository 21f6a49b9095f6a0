"""FetchReplies: how a fetch's rows travel back to the client.

Either in the response, encoded in each table's wire dtype, or, when the client shares the shard's
host and names a shared-memory reply file (memory_service/wire/reply_files.py), written straight
into that file at the offsets the request gives, the response then carrying only each table's
name, dtype and width.
"""
from __future__ import annotations

import numpy as np

from memory_service.config import TableConfig
from memory_service.errors import FailedPrecondition
from memory_service.rpc import memory_pb2
from memory_service.wire import codec
from memory_service.wire.reply_files import ReplyFiles


def reply_nbytes(requests: dict[str, np.ndarray], configs: dict[str, TableConfig]) -> int:
    """Bytes of rows a fetch of ids (n,) per table answers, in the tables' wire dtypes."""
    return sum(len(ids) * configs[name].wire_row_bytes for name, ids in requests.items())


class FetchReplies:
    """Builds the shard's fetch responses, keeping the clients' reply files open between them."""

    def __init__(self) -> None:
        self.files = ReplyFiles()

    def open(self, request: memory_pb2.FetchRequest) -> None:
        """Opens the reply file the request names, if any (FailedPrecondition when it is not on
        this host). Called before any row is read, so a request that cannot be answered reads none."""
        if not request.HasField("shared_memory"):
            return
        path = request.shared_memory.path
        try:
            self.files.open(path)
        except OSError:
            raise FailedPrecondition(
                f"shared-memory reply file {path!r} cannot be opened on this shard's host") from None

    def response(self, request: memory_pb2.FetchRequest, rows: dict[str, np.ndarray],
                 configs: dict[str, TableConfig]) -> memory_pb2.FetchResponse:
        """The response to `request` with each table's rows (n, width) float32: in the reply file
        the request names (the response then holds no rows), else in the message."""
        if request.HasField("shared_memory"):
            path = request.shared_memory.path
            try:
                self.files.write(path, [(msg.reply_offset, rows[msg.table], codec.word_dtype(configs[msg.table]))
                                        for msg in request.tables])
            except OSError as err:  # /dev/shm full, say: the client falls back to gRPC replies
                raise FailedPrecondition(f"shared-memory reply file {path!r} cannot be written: {err}") from None
            payloads = [b""] * len(rows)
        else:
            payloads = [codec.encode_rows(rows[name], codec.word_dtype(cfg)) for name, cfg in configs.items()]
        # tables.add sets the fields in place: a TableRows built apart is copied again, rows and
        # all, when the response takes it (MergeFrom: 2 MiB more a 8k-row reply)
        response = memory_pb2.FetchResponse()
        for (name, cfg), payload in zip(configs.items(), payloads):
            response.tables.add(table=name, dtype=codec.wire_dtype_to_proto(cfg), width=cfg.width, rows=payload)
        return response
