"""Raw token ids -> Engram row ids of every Engram layer: compression, then multi-head hashing.

Row ids depend only on the tokens, so they are computed as soon as a batch (or a sampled token) is
known, on the tokens' device, before the forward pass needs the rows.
"""
from __future__ import annotations

import numpy as np
import torch

from trainer.engram import EngramConfig
from trainer.fingerprint import ngram_fingerprints
from trainer.hashing import NgramHashConfig, NgramHasher
from trainer.kernels import triton_installed
from trainer.tokenizer_compression import TokenizerCompression


def identity_compression(vocab_size: int) -> TokenizerCompression:
    """The no-compression ablation: every raw id is its own canonical id."""
    return TokenizerCompression(lookup=np.arange(vocab_size, dtype=np.int64), num_canonical=vocab_size)


class RowIndexer:
    """Maps raw token ids (B, T) to {layer: row ids (B, T, H)} for an Engram config."""

    def __init__(self, cfg: EngramConfig, compression: TokenizerCompression, raw_pad_id: int):
        self.cfg = cfg
        self.compression = compression
        self.hasher = NgramHasher(NgramHashConfig(
            vocab_size=compression.num_canonical, table_sizes=cfg.table_sizes, max_ngram=cfg.max_ngram,
            heads_per_ngram=cfg.heads_per_ngram, layer_ids=cfg.layer_ids,
            pad_id=compression.map_pad(raw_pad_id), seed=cfg.seed))

    def table_sizes(self) -> dict[int, list[int]]:
        """{layer: prime row count of each (order, head) table, in row-id column order}."""
        return {layer: self.hasher.table_sizes(layer) for layer in self.cfg.layer_ids}

    def __call__(self, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """Row ids {layer: (B, T, H)} of whole sequences `tokens` (B, T), raw ids."""
        return self.hash(self.compression.compress_torch(tokens))

    def initial_recent_ids(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, max_ngram - 1) compressed pad ids: what the hash reads before a sequence starts,
        so `extend` from these gives a sequence's first tokens the rows `__call__` gives them."""
        return torch.full((batch_size, self.cfg.max_ngram - 1), self.hasher.cfg.pad_id,
                          dtype=torch.int64, device=device)

    def extend(self, recent_ids: torch.Tensor,
               tokens: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Row ids of raw `tokens` (B, T) appended to sequences whose last max_ngram - 1
        compressed ids are `recent_ids` (B, max_ngram - 1) -> ({layer: (B, T, H)}, the new
        recent ids). Bit-identical to `__call__` on the whole sequences: this hashes the recent
        ids and the new ones as one sequence, and a new token's N-grams reach back at most
        max_ngram - 1 positions, so they never reach the pad the hash puts before that sequence."""
        n = self.cfg.max_ngram - 1
        if recent_ids.dim() != 2 or recent_ids.shape[1] != n or tokens.dim() != 2 \
                or recent_ids.shape[0] != tokens.shape[0]:
            raise ValueError(f"recent_ids {tuple(recent_ids.shape)} and tokens {tuple(tokens.shape)} must be "
                             f"(B, {n}) and (B, T)")
        ids = torch.cat([recent_ids, self.compression.compress_torch(tokens)], dim=1)  # (B, n + T)
        rows = self.hash(ids)
        return {layer: r[:, n:].contiguous() for layer, r in rows.items()}, ids[:, -n:]

    def hash(self, compressed: torch.Tensor) -> dict[int, torch.Tensor]:
        """Row ids {layer: (B, T, H)} of compressed ids (B, T), on their device."""
        if compressed.is_cuda and triton_installed():  # one Triton kernel per layer, no host round trip
            from trainer.kernels.hashing import hash_layer
            return {layer: hash_layer(self.hasher, compressed, layer) for layer in self.cfg.layer_ids}
        return {layer: self.hasher.hash_torch(compressed, layer) for layer in self.cfg.layer_ids}

    def fingerprints(self, tokens: torch.Tensor) -> dict[int, np.ndarray]:
        """{layer: (B, T, H) uint64}: the fingerprint of the N-gram behind each row id that
        `__call__` returns (same columns: the heads of n = 2 first, then n = 3, ...), for the table
        service's collision stats. Equal for every layer: the N-grams do not depend on it."""
        compressed = self.compression.compress_torch(tokens).cpu().numpy()  # (B, T) int64
        per_order = ngram_fingerprints(compressed, self.cfg.max_ngram, self.hasher.cfg.pad_id)
        K = self.cfg.heads_per_ngram
        columns = np.repeat(np.stack(per_order, axis=-1), K, axis=-1)  # (B, T, (max_ngram-1)*K)
        return {layer: columns for layer in self.cfg.layer_ids}
