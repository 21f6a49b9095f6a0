"""Multi-head N-gram hashing: compressed token ids -> row ids of the Engram embedding tables.

Bit-identical to DeepSeek's reference (`NgramHashMapping` in deepseek-ai/Engram
engram_demo_v1.py; ENGRAM.md section 2): odd per-layer multipliers drawn from
`numpy.random.default_rng(seed + 10007 * layer)`, an XOR of wrapping int64 products over the
suffix N-gram, and distinct prime table sizes, one per (layer, n, head). The row ids index tables
that live in the memory service, so the trainer, the prefetcher and inference must agree on every
bit; the numpy path is the reference and the torch path computes the same on any device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_LAYER_SEED_STRIDE = 10007  # the reference's PRIME_1: seeds of different layers stay apart
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic below 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n below 3.3e24 (so for all int64 sizes)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unseen_prime(start: int, seen: set[int]) -> int:
    """The smallest prime strictly above `start` that is not in `seen` (the reference's search)."""
    candidate = start + 1
    while not is_prime(candidate) or candidate in seen:
        candidate += 1
    return candidate


@dataclass(frozen=True, slots=True)
class NgramHashConfig:
    """What fixes the hash: the compressed vocabulary size V', the configured table size per order
    n = 2..max_ngram, heads per order, the Engram layers (their order fixes the primes), the pad id
    (already compressed) and the seed."""
    vocab_size: int
    table_sizes: tuple[int, ...]
    max_ngram: int = 3
    heads_per_ngram: int = 8
    layer_ids: tuple[int, ...] = (1, 15)
    pad_id: int = 2
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "table_sizes", tuple(int(s) for s in self.table_sizes))
        object.__setattr__(self, "layer_ids", tuple(int(i) for i in self.layer_ids))
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 1")
        if self.max_ngram < 2:
            raise ValueError(f"max_ngram={self.max_ngram} must be >= 2")
        if len(self.table_sizes) != self.max_ngram - 1:
            raise ValueError(f"table_sizes={self.table_sizes} has {len(self.table_sizes)} entries; "
                             f"need max_ngram - 1 = {self.max_ngram - 1} (one per n = 2..max_ngram)")
        if min(self.table_sizes) < 2:
            raise ValueError(f"table_sizes={self.table_sizes}: every size must be >= 2")
        if self.heads_per_ngram < 1:
            raise ValueError(f"heads_per_ngram={self.heads_per_ngram} must be >= 1")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} must be in [0, vocab_size={self.vocab_size})")
        if not self.layer_ids or min(self.layer_ids) < 0 or len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids={self.layer_ids} must be non-empty, distinct and >= 0")
        if self.seed < 0:  # default_rng rejects negative seeds
            raise ValueError(f"seed={self.seed} must be >= 0")


class NgramHasher:
    """Maps compressed ids (B, T) to per-head table rows (B, T, (max_ngram-1) * heads_per_ngram)
    for each Engram layer. Columns: all heads of n=2 first, then n=3, ... (the table order)."""

    def __init__(self, cfg: NgramHashConfig):
        self.cfg = cfg
        # m <= 2*half_bound - 1 < (2**63 - 1) // V', so m * id for any id < V' fits in int64: the
        # products never wrap and their XOR stays non-negative. Arithmetic is still int64 as in the
        # reference, so the rows match it bit for bit.
        half_bound = max(1, ((2**63 - 1) // cfg.vocab_size) // 2)
        self.multipliers: dict[int, np.ndarray] = {}
        for layer in cfg.layer_ids:
            rng = np.random.default_rng(cfg.seed + _LAYER_SEED_STRIDE * layer)
            r = rng.integers(low=0, high=half_bound, size=(cfg.max_ngram,), dtype=np.int64)
            self.multipliers[layer] = r * 2 + 1  # (max_ngram,) odd, so invertible mod 2**64
        self.primes = self._choose_primes()  # layer -> [order n][head] prime table size
        self._torch_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _choose_primes(self) -> dict[int, list[list[int]]]:
        # One `seen` set across all layers, walked in configured order: every table gets a
        # distinct prime, so no two heads collide in the same way.
        seen: set[int] = set()
        primes: dict[int, list[list[int]]] = {}
        for layer in self.cfg.layer_ids:
            primes[layer] = []
            for size in self.cfg.table_sizes:
                heads, start = [], size - 1
                for _ in range(self.cfg.heads_per_ngram):
                    start = next_unseen_prime(start, seen)
                    seen.add(start)
                    heads.append(start)
                primes[layer].append(heads)
        return primes

    def table_sizes(self, layer: int) -> list[int]:
        """Prime row counts of `layer`'s tables, flattened in output-column order."""
        return [p for heads in self.primes[self._check_layer(layer)] for p in heads]

    def _check_layer(self, layer: int) -> int:
        if layer not in self.multipliers:
            raise KeyError(f"layer={layer} is not an Engram layer; configured layers are {self.cfg.layer_ids}")
        return layer

    def hash(self, ids: np.ndarray, layer: int) -> np.ndarray:
        """Row ids (B, T, (max_ngram-1)*heads) int64 of compressed `ids` (B, T) int64 for `layer`."""
        m, cfg = self.multipliers[self._check_layer(layer)], self.cfg
        if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 2:
            raise ValueError(f"ids must be a 2-D (B, T) int64 numpy array, got {type(ids).__name__} "
                             f"{getattr(ids, 'dtype', None)} shape {getattr(ids, 'shape', None)}")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"ids range [{ids.min()}, {ids.max()}] outside [0, vocab_size={cfg.vocab_size})")
        T = ids.shape[1]
        # shifts[k][b, t] = ids[b, t-k], pad_id where t < k: (B, T) each
        shifts = [np.pad(ids, ((0, 0), (k, 0)), constant_values=cfg.pad_id)[:, :T] for k in range(cfg.max_ngram)]
        out, mix = [], shifts[0] * m[0]  # (B, T), wrapping int64
        for n, heads in zip(range(2, cfg.max_ngram + 1), self.primes[layer]):
            mix = mix ^ (shifts[n - 1] * m[n - 1])  # (B, T): mix of the n-gram ending at t
            out.append(mix[:, :, None] % np.array(heads, dtype=np.int64))  # (B, T, heads)
        return np.concatenate(out, axis=2)  # (B, T, (max_ngram-1)*heads)

    def hash_all(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """`hash` for every configured layer: layer -> (B, T, (max_ngram-1)*heads) int64."""
        return {layer: self.hash(ids, layer) for layer in self.cfg.layer_ids}

    def hash_torch(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """`hash` on a torch int64 (B, T) tensor, on its own device with no host round trip.

        Values are not range-checked here (that would sync the device); `hash` checks them."""
        cfg = self.cfg
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2:
            raise ValueError(f"ids must be a 2-D (B, T) torch.int64 tensor, got {type(ids).__name__} "
                             f"{getattr(ids, 'dtype', None)} shape {tuple(getattr(ids, 'shape', ()))}")
        m, primes = self._device_tables(self._check_layer(layer), ids.device)
        T, K = ids.shape[1], cfg.heads_per_ngram
        # shifts[k][b, t] = ids[b, t-k], pad_id where t < k: (B, T) each
        shifts = [F.pad(ids, (k, 0), value=cfg.pad_id)[:, :T] for k in range(cfg.max_ngram)]
        out, mix = [], shifts[0] * m[0]  # (B, T); torch int64 multiply wraps like numpy's
        for i in range(cfg.max_ngram - 1):
            mix = torch.bitwise_xor(mix, shifts[i + 1] * m[i + 1])  # (B, T) for n = i + 2
            # remainder takes the divisor's sign, so rows are non-negative like numpy's %
            out.append(torch.remainder(mix.unsqueeze(-1), primes[i * K:(i + 1) * K]))  # (B, T, K)
        return torch.cat(out, dim=2)  # (B, T, (max_ngram-1)*K)

    def _device_tables(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Built once per (layer, device) so the hot path never copies host constants.
        key = (layer, device)
        if key not in self._torch_cache:
            m = torch.from_numpy(self.multipliers[layer]).to(device)  # (max_ngram,)
            p = torch.tensor(self.table_sizes(layer), dtype=torch.int64, device=device)  # ((max_ngram-1)*K,)
            self._torch_cache[key] = (m, p)
        return self._torch_cache[key]
