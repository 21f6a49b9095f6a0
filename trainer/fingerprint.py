"""64-bit fingerprints of the suffix N-grams behind Engram lookups, for the table service's
collision stats (memory_service/ops/collisions.py).

A row id is mix(N-gram) mod a prime: two different N-grams can share a row, and the service can
only tell them apart if each lookup carries something that identifies the N-gram itself. The
fingerprint chains splitmix64's finaliser over the compressed token ids, newest first:

    h_1 = mix64(x'(t) * C + 1),   h_n = mix64(h_(n-1) ^ (x'(t-n+1) * C + n))

so h_n identifies (x'(t-n+1), ..., x'(t)) up to a 2^-64 chance, independently of the row hash
(whose multipliers and primes differ). Positions before the sequence start use the compressed pad
id, exactly as the row hash does (ENGRAM.md section 2), so the fingerprint and the row id describe
the same tuple.
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import mix64

_C = np.uint64(0xD6E8FEB86659FD93)  # odd: token * _C is a bijection of uint64


def ngram_fingerprints(ids: np.ndarray, max_ngram: int, pad_id: int) -> list[np.ndarray]:
    """Compressed ids (B, T) int64 -> [fingerprints (B, T) uint64 for n = 2..max_ngram] of the
    N-gram ending at each position."""
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 2-D (B, T) integer array, got {ids.dtype} of shape {ids.shape}")
    if max_ngram < 2:
        raise ValueError(f"max_ngram {max_ngram} must be >= 2")
    T = ids.shape[1]
    # shifted[k][b, t] = ids[b, t-k], pad_id where t < k: (B, T) each, as in trainer/hashing.py
    shifted = [np.pad(ids, ((0, 0), (k, 0)), constant_values=pad_id)[:, :T].astype(np.uint64)
               for k in range(max_ngram)]
    h = mix64(shifted[0] * _C + np.uint64(1))  # (B, T) unigram
    out = []
    for n in range(2, max_ngram + 1):
        h = mix64(h ^ (shifted[n - 1] * _C + np.uint64(n)))  # (B, T) N-gram of order n
        out.append(h)
    return out
