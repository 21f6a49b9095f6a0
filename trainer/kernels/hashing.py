"""Triton kernel for the N-gram row ids of one Engram layer, bit-identical to trainer/hashing.py.

Per token t: mix_n = (x[t] * m_0) ^ (x[t-1] * m_1) ^ ... ^ (x[t-n+1] * m_(n-1)) in wrapping int64
(the pad id before the sequence start), then row = mix_n mod prime for each head of order n, with a
non-negative result as numpy's `%`. One kernel writes every head's row id, so the trainer hashes
on the device the tokens are already on: no host round trip, one pass instead of torch's ~10 ops.

File order: the kernel, the launcher (checks shapes and dtypes, picks the grid), the entry point
from an `NgramHasher`. The reference is `NgramHasher.hash` (numpy) in trainer/hashing.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.hashing import NgramHasher

BLOCK_TOKENS = 1024  # tokens per program: int64 work is light, so a program takes many


@triton.jit
def _ngram_hash_kernel(ids_ptr, mult_ptr, primes_ptr, rows_ptr, N, T, pad_id, MAX_NGRAM: tl.constexpr,
                       HEADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """rows (N, (MAX_NGRAM-1) * HEADS) int64 of ids (N,) = (B*T,) flattened, for BLOCK_N tokens."""
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = tokens < N
    t = tokens % T  # position in its sequence: ids before it are the pad id
    tokens = tokens.to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mix = tl.load(ids_ptr + tokens, mask=in_range, other=0) * tl.load(mult_ptr)  # (BLOCK_N,) int64
    for i in tl.static_range(1, MAX_NGRAM):  # order n = i + 1
        prev = tl.load(ids_ptr + tokens - i, mask=in_range & (t >= i), other=0)
        prev = tl.where(t >= i, prev, pad_id)  # promoted to int64 with prev
        mix = mix ^ (prev * tl.load(mult_ptr + i))  # int64 multiply wraps, as numpy's
        primes = tl.load(primes_ptr + (i - 1) * HEADS + heads, mask=heads < HEADS, other=1)  # (BLOCK_H,)
        rows = mix[:, None] % primes[None, :]  # (BLOCK_N, BLOCK_H): sign of the dividend, as C
        rows = tl.where(rows < 0, rows + primes[None, :], rows)  # numpy's %: sign of the divisor
        tl.store(rows_ptr + tokens[:, None] * ((MAX_NGRAM - 1) * HEADS) + (i - 1) * HEADS + heads[None, :],
                 rows, mask=in_range[:, None] & (heads < HEADS)[None, :])


def ngram_rows(ids: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, pad_id: int,
               heads_per_ngram: int) -> torch.Tensor:
    """ids (B, T) int64, multipliers (max_ngram,) int64, primes ((max_ngram-1) * heads,) int64 on the
    same device -> row ids (B, T, (max_ngram-1) * heads) int64, heads of n = 2 first."""
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"ids must be a (B, T) int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    max_ngram = multipliers.numel()
    if multipliers.dtype != torch.int64 or max_ngram < 2:
        raise ValueError(f"multipliers must be >= 2 int64 values, got {max_ngram} {multipliers.dtype}")
    if primes.dtype != torch.int64 or primes.numel() != (max_ngram - 1) * heads_per_ngram:
        raise ValueError(f"primes must be (max_ngram-1) * heads = {(max_ngram - 1) * heads_per_ngram} int64 "
                         f"values, got {primes.numel()} {primes.dtype}")
    for name, x in (("multipliers", multipliers), ("primes", primes)):
        if x.device != ids.device:
            raise ValueError(f"{name} on {x.device}, ids on {ids.device}")
    B, T = ids.shape
    ids, multipliers, primes = ids.contiguous(), multipliers.contiguous(), primes.contiguous()
    rows = torch.empty(B, T, primes.numel(), dtype=torch.int64, device=ids.device)
    if ids.numel():
        _ngram_hash_kernel[(triton.cdiv(B * T, BLOCK_TOKENS),)](
            ids, multipliers, primes, rows, B * T, T, pad_id, MAX_NGRAM=max_ngram, HEADS=heads_per_ngram,
            BLOCK_N=BLOCK_TOKENS, BLOCK_H=triton.next_power_of_2(heads_per_ngram))
    return rows


def hash_layer(hasher: NgramHasher, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """`hasher.hash_torch(ids, layer)` in one kernel: ids (B, T) int64 -> (B, T, H) int64 row ids.
    Values are not range-checked (that would sync the device); `NgramHasher.hash` checks them."""
    multipliers, primes = hasher._device_tables(hasher._check_layer(layer), ids.device)  # cached per device
    return ngram_rows(ids, multipliers, primes, hasher.cfg.pad_id, hasher.cfg.heads_per_ngram)
