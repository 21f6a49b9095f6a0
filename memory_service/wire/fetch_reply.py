"""FetchReply: a FetchResponse read straight from its serialized bytes, rows left in place.

A FetchResponse with rows inside is mostly one large `bytes` field per table. Parsed by protobuf,
its rows are copied twice before the client sees them (into the parsed message, then into a new
`bytes` object on each access of `.rows`); read here, each table's rows are a memoryview of the
bytes gRPC handed over, copied once, into the fetch's layout. The client's transport reads Fetch
replies with `FetchReply.parse` (its response deserializer). The format is FetchResponse and
TableRows of proto/engram_memory/v1/memory.proto in the protobuf wire format: fields this reader
does not know are skipped, as protobuf does; anything malformed is InvalidArgument.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memory_service.errors import InvalidArgument

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5  # protobuf wire types


@dataclass
class TableRowsView:
    """One TableRows: what FetchRound and ReplyLayout read of it (`rows` a view, no copy)."""
    table: str = ""
    dtype: int = 0  # DType enum value
    width: int = 0
    rows: memoryview = field(default_factory=lambda: memoryview(b""))


@dataclass
class FetchReply:
    """A FetchResponse: `tables` in the shard's order (the request's)."""
    tables: list[TableRowsView]

    @staticmethod
    def parse(data: bytes) -> "FetchReply":
        """The reply serialized in `data`; its rows views keep `data` alive."""
        view = memoryview(data)
        tables = [_table_rows(view[start:stop]) for number, kind, start, stop in _fields(view)
                  if number == 1 and kind == _LENGTH]
        return FetchReply(tables)


def _table_rows(view: memoryview) -> TableRowsView:
    out = TableRowsView()
    for number, kind, start, stop in _fields(view):
        if number == 1 and kind == _LENGTH:
            try:
                out.table = str(view[start:stop], "utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument("fetch reply: a table name is not UTF-8") from None
        elif number in (2, 3) and kind == _VARINT:
            value = _varint(view, start)[0]
            if number == 2:
                out.dtype = value - (1 << 64) if value >= 1 << 63 else value  # an enum is an int32
            else:
                out.width = value & 0xFFFFFFFF  # uint32 keeps the low 32 bits
        elif number == 4 and kind == _LENGTH:
            out.rows = view[start:stop]
    return out


def _fields(view: memoryview):
    """(field number, wire type, start, stop) of each field of the message in `view`; a varint's
    (start, stop) spans its encoding, a length-delimited field's its payload."""
    at, end = 0, len(view)
    while at < end:
        key, at = _varint(view, at)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise InvalidArgument("fetch reply: field number 0")
        if kind == _VARINT:
            start = at
            at = _varint(view, at)[1]
        elif kind == _LENGTH:
            size, start = _varint(view, at)
            at = start + size
        elif kind in (_FIXED64, _FIXED32):
            start, at = at, at + (8 if kind == _FIXED64 else 4)
        else:
            raise InvalidArgument(f"fetch reply: wire type {kind} of field {number} is not supported")
        if at > end:
            raise InvalidArgument(f"fetch reply: field {number} runs {at - end} bytes past the end")
        yield number, kind, start, at


def _varint(view: memoryview, at: int) -> tuple[int, int]:
    """(value, position after it) of the base-128 varint at `at`."""
    value = shift = 0
    while True:
        if at >= len(view) or shift > 63:
            raise InvalidArgument("fetch reply: a truncated or overlong varint")
        byte = view[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at
