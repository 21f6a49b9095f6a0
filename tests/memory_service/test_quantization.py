"""The row codecs of quantized tables (memory_service/quantization.py): fp8 e4m3 codes agree bit
for bit with torch's float8_e4m3fn, the packed layout round-trips, and the documented error
bounds hold on random and adversarial rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_service import quantization as quant

KINDS = ["fp8_e4m3", "int8"]


def test_fp8_codes_agree_with_torch_over_a_stride_of_every_float32():
    bits = np.arange(0, 2**32, 4093, dtype=np.uint64).astype(np.uint32)  # 1M patterns: all exponents, both signs
    values = np.concatenate([bits.view(np.float32), np.array([448, 464, 464.0001, 480, 1e30, np.inf, -np.inf,
                                                              2.0**-6, 2.0**-9, 2.0**-10, 3 * 2.0**-10, -0.0],
                                                             np.float32)])
    want = torch.from_numpy(values.copy()).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(quant.fp8_e4m3_bits(values), want)


def test_fp8_values_are_torchs():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(quant.FP8_VALUES, want)


def test_dequantize_agrees_with_torch_on_the_codes():
    rows = np.random.default_rng(1).standard_normal((64, 33)).astype(np.float32)
    packed = quant.quantize(rows, "fp8_e4m3")
    raw = packed.view(np.uint8)
    scale = torch.from_numpy(raw[:, :4].copy().view(np.float32))  # (n, 1)
    codes = torch.from_numpy(raw[:, 4:37].copy()).view(torch.float8_e4m3fn)
    np.testing.assert_array_equal(quant.dequantize(packed, 33, "fp8_e4m3"), (codes.to(torch.float32) * scale).numpy())
    # and the codes are torch's of the rows over their scale
    want = (torch.from_numpy(rows) / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(raw[:, 4:37], want)


def adversarial_rows(width: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    rows = [np.zeros(width), rng.standard_normal(width),
            rng.standard_normal(width) * 1e-40,  # subnormals
            np.full(width, np.finfo(np.float32).smallest_subnormal),
            rng.uniform(-1, 1, width) * 3e38,  # near float32's largest
            np.concatenate([[1e30], rng.standard_normal(width - 1)]),  # one huge value
            np.concatenate([[-1e-30], np.zeros(width - 1)]), np.full(width, 1 / 3)]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width", [1, 3, 160])
def test_error_bound_holds(kind, width):
    rng = np.random.default_rng(width)
    random = rng.standard_normal((500, width)) * np.exp(rng.uniform(-30, 30, (500, 1)))  # magnitudes e^-30..e^30
    rows = np.concatenate([adversarial_rows(width) if width > 1 else np.zeros((1, 1), np.float32),
                           random.astype(np.float32)])
    got = quant.dequantize(quant.quantize(rows, kind), width, kind)
    err = np.abs(got.astype(np.float64) - rows)
    assert np.isfinite(got).all()
    assert (err <= quant.bound(rows, kind)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_packed_layout(kind):
    rows = np.random.default_rng(2).standard_normal((5, 160)).astype(np.float32)
    packed = quant.quantize(rows, kind)
    assert packed.shape == (5, 41) and packed.dtype == np.float32  # 164 bytes a row against 320 in bf16
    raw = packed.view(np.uint8)
    scale = raw[:, :4].copy().view("<f4")[:, 0]
    np.testing.assert_array_equal(scale, quant.row_scales(rows, kind))
    limit = 448 if kind == "fp8_e4m3" else 127
    np.testing.assert_allclose(scale, np.abs(rows).max(axis=1) / limit, rtol=1e-6)
    # bytes in, the same bytes back: the wire's and storage's copies change nothing
    again = np.frombuffer(packed.tobytes(), "<f4").reshape(5, 41)
    np.testing.assert_array_equal(quant.dequantize(again, 160, kind), quant.dequantize(packed, 160, kind))
    assert not raw[:, 4 + 160:].any()  # padding (none at 160) stays zero


def test_int8_rounds_half_to_even():
    rows = np.array([[127, 0.5, 1.5, 2.5, -0.5, -1.5]], np.float32)  # scale 1
    codes = quant.quantize(rows, "int8").view(np.uint8)[0, 4:10].view(np.int8)
    assert codes.tolist() == [127, 0, 2, 2, 0, -2]


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="quantization"):
        quant.quantize(np.zeros((1, 4), np.float32), "fp4")
