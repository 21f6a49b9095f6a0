"""Quantized rows of frozen tables: fp8 e4m3 and int8 codes with a float32 scale per row.

A packed row is `packed_width(width)` float32 words (the storage tiers keep it as such, never
touching the words as numbers): byte 0..3 the row's scale (float32 little-endian), bytes 4..4+width
the codes, zero bytes to the end. Width 160: 164 bytes, against 320 in bf16. Value i is
`decode(code_i) * scale`, computed in float32.

Rows are finite (a table's rows always are: updates that would not be are refused).

- fp8_e4m3: scale = amax / 448 (448 is e4m3fn's largest value); code = the e4m3fn bits of
  float32(x / scale), rounded to nearest even exactly as torch's `.to(torch.float8_e4m3fn)`.
  Error bound, per value: |x - q(x)| <= |x| * (2**-4 + 2**-22) + scale * 2**-10 + 2**-149.
  Why: e4m3 keeps 3 mantissa bits, so rounding a normal q = x / scale moves it by at most half
  an ulp, |q| * 2**-4; a subnormal (|q| < 2**-6) by at most half the subnormal step 2**-9, i.e.
  2**-10, which is scale * 2**-10 in x's units; the float32 division and the product with the
  scale each add one float32 rounding (relative 2**-24, together below |x| * 2**-22), or at most
  2**-149 where the product is a float32 subnormal.
- int8: scale = amax / 127; code = round-half-to-even(float32(x / scale)) in [-127, 127].
  Error bound: |x - q(x)| <= scale / 2 + |x| * 2**-22 + 2**-149 (half a step, plus the same
  float32 roundings).

The scale is bumped to the next float32 where rounding left amax / scale above 448 (127), and
is at least the smallest float32 subnormal for a row with amax > 0, so codes never saturate
(a row of subnormals keeps the bound). An all-zero row has scale 0 and codes 0.
"""
from __future__ import annotations

import numpy as np

FP8_MAX = 448.0  # largest finite float8 e4m3fn
INT8_MAX = 127
_LIMIT = {"fp8_e4m3": FP8_MAX, "int8": float(INT8_MAX)}
_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


def packed_width(width: int) -> int:
    """float32 words of a packed row of `width` values: a scale and `width` one-byte codes."""
    return -(-(width + 4) // 4)


def _check_kind(kind: str) -> float:
    if kind not in _LIMIT:
        raise ValueError(f"quantization {kind!r} must be one of {tuple(_LIMIT)}")
    return _LIMIT[kind]


def row_scales(rows: np.ndarray, kind: str) -> np.ndarray:
    """Per-row scales (n,) float32 of rows (n, w) float32: amax / limit, bumped as the module
    docstring says so that amax / scale <= limit in float32."""
    limit = _check_kind(kind)
    amax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(len(rows), np.float32)  # (n,)
    amax = amax.astype(np.float32)
    scale = amax / np.float32(limit)  # (n,)
    scale = np.where((amax > 0) & (scale < _TINY), _TINY, scale).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        over = (amax > 0) & (amax / scale > np.float32(limit))
    scale[over] = np.nextafter(scale[over], np.float32(np.inf))
    return scale


def fp8_e4m3_bits(q: np.ndarray) -> np.ndarray:
    """float32 values -> uint8 e4m3fn bit patterns, as torch's x.to(torch.float8_e4m3fn) on CPU
    (torch 2.13, checked over a stride of every float32 in the tests): round to nearest even,
    saturating: |x| > 448 (inf included) gives +-448, NaN the NaN code 0x7f with its sign. (c10's
    scalar fp8e4m3fn_from_fp32_value gives NaN from 480 up instead; quantize never meets either,
    its scaled values stay within 448.)"""
    bits = np.ascontiguousarray(q, dtype="<f4").view(np.uint32)
    sign = bits & np.uint32(0x80000000)
    mag = bits ^ sign  # |x| as bits
    out = np.empty(bits.shape, np.uint32)
    small = mag < np.uint32(121 << 23)  # below 2**-6, e4m3's smallest normal: subnormal codes
    denorm = np.uint32(141 << 23)  # 2**14: adding it rounds to a multiple of 2**-9 (the subnormal step)
    summed = (mag[small].view(np.float32) + denorm.view(np.float32)).view(np.uint32)
    out[small] = summed - denorm
    normal = mag[~small]
    mant_odd = (normal >> np.uint32(20)) & np.uint32(1)
    normal = normal + np.uint32(((7 - 127) << 23) & 0xFFFFFFFF) + np.uint32(0x7FFFF) + mant_odd
    out[~small] = normal >> np.uint32(20)
    out[mag >= np.uint32(0x43E00000)] = 0x7E  # >= 448.0 (inf too): saturates to 448
    out[mag > np.uint32(0x7F800000)] = 0x7F  # NaN
    return ((out & np.uint32(0xFF)) | (sign >> np.uint32(24))).astype(np.uint8)


def _fp8_table() -> np.ndarray:
    """The float32 value of each of the 256 e4m3fn codes (NaN for 0x7f and 0xff)."""
    codes = np.arange(256, dtype=np.uint32)
    exp, mant = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    value = np.where(exp == 0, mant * 2.0**-9, (1 + mant / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    value = np.where(codes & 0x80, -value, value)
    value[(codes & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


FP8_VALUES = _fp8_table()  # (256,) float32: code -> value


def quantize(rows: np.ndarray, kind: str) -> np.ndarray:
    """Rows (n, w) float32 -> packed rows (n, packed_width(w)) float32 words (the layout above)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, width = rows.shape
    limit = _check_kind(kind)
    scale = row_scales(rows, kind)  # (n,)
    divisor = np.where(scale > 0, scale, np.float32(1))[:, None]
    q = rows / divisor  # (n, w) float32
    if kind == "int8":
        codes = np.clip(np.rint(q), -limit, limit).astype(np.int8).view(np.uint8)
    else:
        codes = fp8_e4m3_bits(np.clip(q, -limit, limit))
    packed = np.zeros((n, 4 * packed_width(width)), np.uint8)  # (n, bytes)
    packed[:, :4] = scale.astype("<f4").view(np.uint8).reshape(n, 4)
    packed[:, 4:4 + width] = codes
    return packed.view("<f4")


def dequantize(packed: np.ndarray, width: int, kind: str) -> np.ndarray:
    """Packed rows (n, packed_width(width)) float32 words (or their (n, 4 * packed_width) bytes)
    -> rows (n, width) float32: code value * scale, in float32."""
    _check_kind(kind)
    raw = np.ascontiguousarray(packed).view(np.uint8)
    raw = raw.reshape(len(raw), -1)  # (n, bytes)
    if raw.shape[1] != 4 * packed_width(width):
        raise ValueError(f"packed rows of {raw.shape[1]} bytes, expected {4 * packed_width(width)} for width {width}")
    scale = np.ascontiguousarray(raw[:, :4]).view("<f4")  # (n, 1)
    codes = raw[:, 4:4 + width]  # (n, w)
    values = FP8_VALUES[codes] if kind == "fp8_e4m3" else codes.view(np.int8).astype(np.float32)
    values *= scale
    return values


def bound(rows: np.ndarray, kind: str) -> np.ndarray:
    """The documented per-value error bound (n, w) of `quantize` then `dequantize` of rows."""
    scale = row_scales(np.asarray(rows, np.float32), kind)[:, None].astype(np.float64)
    x = np.abs(rows.astype(np.float64))
    if kind == "int8":
        return scale / 2 + x * 2.0**-22 + 2.0**-149
    return x * (2.0**-4 + 2.0**-22) + scale * 2.0**-10 + 2.0**-149
