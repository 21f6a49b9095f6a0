"""memory_service.wire.codec: ids and rows <-> little-endian bytes, configs <-> messages."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from memory_service.wire import codec
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import InvalidArgument
from memory_service.rpc import memory_pb2
from memory_service.tables import TableInfo


def _torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


# --- ids ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint64, np.uint16])
def test_ids_round_trip(dtype):
    ids = np.array([0, 1, 7, 12345, 2**15 - 1], dtype=dtype)
    decoded = codec.decode_ids(codec.encode_ids(ids), "t")
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, ids.astype(np.int64))


def test_ids_are_int64_little_endian():
    assert codec.encode_ids(np.array([1, -2])) == struct.pack("<qq", 1, -2)


def test_decode_ids_is_a_view_of_the_payload():
    payload = codec.encode_ids(np.arange(10))
    ids = codec.decode_ids(payload, "t")
    assert not ids.flags.owndata and not ids.flags.writeable


def test_decode_ids_rejects_a_partial_id():
    with pytest.raises(InvalidArgument, match=r"table 'emb': ids payload of 12 bytes is not a multiple of 8"):
        codec.decode_ids(b"\0" * 12, "emb")


def test_encode_ids_rejects_floats():
    with pytest.raises(InvalidArgument, match="ids must be integers, got dtype float64"):
        codec.encode_ids(np.array([1.0]))


# --- rows -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 64), (1, 1), (3, 7), (1000, 64)])
def test_float32_rows_round_trip_exactly(shape):
    rows = np.random.default_rng(0).standard_normal(shape).astype(np.float32)  # (n, width)
    if rows.size:
        rows.flat[:3] = [np.inf, -np.inf, np.nan][: rows.size]
    payload = codec.encode_rows(rows, "float32")
    assert len(payload) == rows.size * 4
    decoded = codec.decode_rows(payload, *shape, "float32", "t")
    assert decoded.dtype == np.float32 and decoded.shape == shape
    np.testing.assert_array_equal(decoded.view(np.uint32), rows.view(np.uint32))  # bit-exact


def test_float32_rows_are_little_endian_and_zero_copy_on_decode():
    payload = codec.encode_rows(np.array([[1.0, -2.5]], np.float32), "float32")
    assert payload == struct.pack("<ff", 1.0, -2.5)
    rows = codec.decode_rows(payload, 1, 2, "float32", "t")
    assert not rows.flags.owndata and not rows.flags.writeable


def test_bfloat16_is_the_upper_half_little_endian():
    assert codec.encode_rows(np.array([[1.0, -2.0]], np.float32), "bfloat16") == b"\x80\x3f\x00\xc0"


def test_bfloat16_rounds_like_torch():
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(100_000).astype(np.float32)
    with np.errstate(over="ignore"):  # from subnormals to overflow into inf
        scaled = normal * np.exp2(rng.integers(-140, 128, normal.size)).astype(np.float32)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (np.arange(1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact halfway cases
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45, 1.0039062],
                     np.float32)
    x = np.concatenate([normal, scaled, bits, ties, edges])
    x = x[~np.isnan(x)]  # NaN bit patterns are checked below: torch's differ by code path
    ours = np.frombuffer(codec.encode_rows(x[None, :], "bfloat16"), "<u2")
    np.testing.assert_array_equal(ours, _torch_bf16_bits(x))


def test_bfloat16_keeps_nan_and_its_sign():
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF], np.uint32)
    payload = codec.encode_rows(nans.view(np.float32)[None, :], "bfloat16")
    decoded = codec.decode_rows(payload, 1, 5, "bfloat16", "t")[0]
    assert np.isnan(decoded).all()
    np.testing.assert_array_equal(np.signbit(decoded), [False, True, False, True, False])


def test_bfloat16_decodes_to_torchs_float32():
    x = np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32)  # (n, width)
    decoded = codec.decode_rows(codec.encode_rows(x, "bfloat16"), 50, 16, "bfloat16", "t")
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("bfloat16", 2)])
def test_decode_rows_rejects_a_wrong_length(dtype, itemsize):
    payload = b"\0" * (3 * 8 * itemsize - 1)
    with pytest.raises(InvalidArgument, match=rf"table 'emb': rows payload of {len(payload)} bytes, "
                                              rf"expected {3 * 8 * itemsize} \(3 rows x width 8"):
        codec.decode_rows(payload, 3, 8, dtype, "emb")


# --- configs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["sparse_adam", "adagrad", "sgd"])
def test_table_config_round_trips(dtype, kind):
    cfg = TableConfig(name="emb/0", num_rows=2**62, width=65536, dtype=dtype, init_scale=0.02,
                      seed=2**64 - 1, optimizer=OptimizerConfig(kind=kind, lr=0.1, beta1=0.5,
                                                                beta2=0.25, eps=1e-10,
                                                                initial_accumulator_value=0.1))
    msg = memory_pb2.TableConfig.FromString(codec.table_config_to_proto(cfg).SerializeToString())
    assert codec.table_config_from_proto(msg) == cfg


def test_table_info_round_trips():
    info = TableInfo(TableConfig(name="t", num_rows=10, width=4), step=3, rows_materialized=2,
                     nbytes=1234)
    assert codec.table_info_from_proto(codec.table_info_to_proto(info)) == info


def _config_msg(**changes) -> memory_pb2.TableConfig:
    msg = codec.table_config_to_proto(TableConfig(name="emb", num_rows=100, width=8))
    for field, value in changes.items():
        setattr(msg, field, value)
    return msg


@pytest.mark.parametrize("changes,message", [
    ({"dtype": memory_pb2.DTYPE_UNSPECIFIED},
     r"table 'emb': dtype DTYPE_UNSPECIFIED must be one of DTYPE_FLOAT32, DTYPE_BFLOAT16"),
    ({"dtype": 7}, r"table 'emb': dtype 7 must be one of"),
    ({"width": 0}, r"table 'emb': width 0 must be in \[1, 65536\]"),
    ({"num_rows": 0}, r"table 'emb': num_rows 0 must be in"),
    ({"init_scale": 0.0}, r"table 'emb': init_scale 0.0 must be > 0"),
    ({"name": ""}, r"table name '' must be 1..256 printable characters"),
])
def test_table_config_from_proto_rejects(changes, message):
    with pytest.raises(InvalidArgument, match=message):
        codec.table_config_from_proto(_config_msg(**changes))


def test_optimizer_config_from_proto_rejects():
    msg = _config_msg()
    msg.optimizer.kind = memory_pb2.OPTIMIZER_KIND_UNSPECIFIED
    with pytest.raises(InvalidArgument, match="table 'emb': optimizer kind OPTIMIZER_KIND_UNSPECIFIED"):
        codec.table_config_from_proto(msg)
    msg = _config_msg()
    msg.optimizer.lr = -1.0
    with pytest.raises(InvalidArgument, match=r"table 'emb': optimizer lr -1.0 must be > 0"):
        codec.table_config_from_proto(msg)
    msg = _config_msg()
    msg.ClearField("optimizer")
    with pytest.raises(InvalidArgument, match="table 'emb': the optimizer config is required"):
        codec.table_config_from_proto(msg)
