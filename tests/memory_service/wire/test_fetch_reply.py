"""FetchReply.parse against protobuf's own parse of real serialized FetchResponses: the same tables,
dtypes, widths and row bytes; unknown fields skipped; malformed bytes InvalidArgument."""
import numpy as np
import pytest

from memory_service.errors import InvalidArgument
from memory_service.rpc import memory_pb2
from memory_service.wire.fetch_reply import FetchReply


def response(*tables) -> memory_pb2.FetchResponse:
    msg = memory_pb2.FetchResponse()
    for name, dtype, width, rows in tables:
        msg.tables.add(table=name, dtype=dtype, width=width, rows=rows)
    return msg


CASES = {
    "empty": response(),
    "one table": response(("emb", memory_pb2.DTYPE_FLOAT32, 64,
                           np.arange(8192 * 64, dtype="<f4").tobytes())),
    "shared-memory reply (no rows), several tables": response(
        ("a", memory_pb2.DTYPE_FLOAT32, 3, b""), ("é-table", memory_pb2.DTYPE_BFLOAT16, 1 << 31, b""),
        ("", 0, 0, b"")),
    "rows of every byte": response(("t", memory_pb2.DTYPE_BFLOAT16, 128, bytes(range(256)) * 300)),
}


@pytest.mark.parametrize("name", CASES)
def test_parse_reads_what_protobuf_reads(name):
    data = CASES[name].SerializeToString()
    got = FetchReply.parse(data)
    want = memory_pb2.FetchResponse.FromString(data)
    assert [(t.table, t.dtype, t.width, bytes(t.rows)) for t in got.tables] == \
           [(t.table, t.dtype, t.width, t.rows) for t in want.tables]


def test_unknown_fields_are_skipped():
    inner = response(("t", 1, 2, b"\x01\x02")).tables[0].SerializeToString()
    unknown = b"\x28\x96\x01" + b"\x31" + bytes(8) + b"\x3d" + bytes(4) + b"\x42\x02ab"  # fields 5-8, each wire type
    data = b"\x0a" + bytes([len(inner + unknown)]) + inner + unknown + b"\x10\x07"  # and field 2 at the top
    got = FetchReply.parse(data)
    assert [(t.table, t.dtype, t.width, bytes(t.rows)) for t in got.tables] == [("t", 1, 2, b"\x01\x02")]
    assert len(memory_pb2.FetchResponse.FromString(data).tables) == 1  # protobuf reads it too


@pytest.mark.parametrize("data, match", [
    (b"\x0a\x05abc", "past the end"),
    (b"\x0a\xff\xff\xff", "truncated or overlong varint"),
    (b"\x0b", "wire type 3"),
    (b"\x00\x01", "field number 0"),
    (b"\x0a\x03\x0a\x01\xff", "not UTF-8"),
])
def test_malformed_bytes_are_invalid_argument(data, match):
    with pytest.raises(InvalidArgument, match=match):
        FetchReply.parse(data)
