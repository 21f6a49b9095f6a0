"""Tokenizer compression: a surjective map P from raw token ids to canonical ids (ENGRAM.md §2).

Tokens that differ only in case, accents, Unicode form or surrounding whitespace ("Hello", " hello",
"HELLO") share one canonical id, so their N-grams hash to the same Engram rows and the effective
vocabulary shrinks (the paper reports 23% for a 128k tokenizer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike

import numpy as np
import tokenizers
import torch
from tokenizers import Regex, normalizers

_SENTINEL = "\ue000"  # a private-use char: holds a lone " " safe across Strip
_REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 byte sequence decodes to

_BASE = [normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
_COLLAPSING = normalizers.Sequence(_BASE + [
    normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
    normalizers.Replace(Regex(r"^ $"), _SENTINEL),
    normalizers.Strip(),
    normalizers.Replace(_SENTINEL, " "),
])
_UNSTRIPPED = normalizers.Sequence(_BASE)
_STRIP = normalizers.Strip()


def normalize_token_text(text: str, keep_whitespace_runs: bool = False) -> str:
    """The canonical key of a token's decoded text (the U+FFFD rule aside, see `from_tokenizer`).

    NFKC, NFD, strip accents, lowercase, collapse runs of [ \\t\\r\\n] to one space, keep a lone
    " ", strip anything else; an empty result falls back to `text` so that tokens such as a lone
    combining accent keep their own id. With `keep_whitespace_runs`, runs are not collapsed and
    whitespace-only tokens are not stripped, so indentation tokens ("    ", "        ") stay
    distinct: on source code the default rule merges dozens of them, costing Engram gain.
    """
    if keep_whitespace_runs:
        unstripped = _UNSTRIPPED.normalize_str(text)
        stripped = _STRIP.normalize_str(unstripped)
        key = stripped if stripped else unstripped  # empty after Strip: whitespace-only, keep it
    else:
        key = _COLLAPSING.normalize_str(text)
    return key if key else text


@dataclass(frozen=True, eq=False)  # eq on an ndarray field would be ambiguous
class TokenizerCompression:
    """The precomputed map P: `lookup[raw_id]` is the canonical id, in [0, num_canonical)."""

    lookup: np.ndarray  # (V,) int64 raw id -> canonical id
    num_canonical: int  # V'
    _device_lookups: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.lookup.ndim != 1 or self.lookup.dtype != np.int64:
            raise ValueError(f"lookup must be 1-D int64, got shape {self.lookup.shape} {self.lookup.dtype}")
        if not 0 < self.num_canonical <= len(self.lookup):
            raise ValueError(f"num_canonical {self.num_canonical} not in [1, {len(self.lookup)}]")
        ids_used = np.unique(self.lookup)  # sorted; surjective onto 0..V'-1 iff it equals arange
        if not np.array_equal(ids_used, np.arange(self.num_canonical)):
            raise ValueError(f"lookup does not map onto exactly 0..{self.num_canonical - 1}")

    @classmethod
    def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer,
                       keep_whitespace_runs: bool = False) -> "TokenizerCompression":
        """Build P over raw ids 0..V-1 (added tokens included), numbering keys by first appearance.

        A token whose decoded text holds U+FFFD (a fragment of a multi-byte character) is keyed by
        its raw token string instead, so that distinct byte fragments keep distinct ids.
        """
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        texts = tokenizer.decode_batch([[tid] for tid in range(vocab_size)], skip_special_tokens=False)
        key_to_canonical: dict[str, int] = {}
        lookup = np.empty(vocab_size, dtype=np.int64)  # (V,)
        for tid, text in enumerate(texts):
            if _REPLACEMENT_CHAR in text:
                key = tokenizer.id_to_token(tid)
            else:
                key = normalize_token_text(text, keep_whitespace_runs)
            lookup[tid] = key_to_canonical.setdefault(key, len(key_to_canonical))
        return cls(lookup, len(key_to_canonical))

    @property
    def raw_vocab_size(self) -> int:
        return len(self.lookup)

    @property
    def ratio(self) -> float:
        """num_canonical / raw_vocab_size: the fraction of the vocabulary left."""
        return self.num_canonical / self.raw_vocab_size

    def summary(self) -> str:
        return (f"{self.raw_vocab_size} -> {self.num_canonical} ids ({self.ratio:.1%}), "
                f"{1 - self.ratio:.1%} smaller")

    def compress(self, ids: np.ndarray) -> np.ndarray:
        """Map raw ids of any shape to canonical ids (int64, same shape)."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.size:
            self._check_range(int(ids.min()), int(ids.max()))
        return self.lookup[ids]

    def compress_torch(self, ids: torch.Tensor) -> torch.Tensor:
        """Map raw ids of any shape to canonical ids (int64) on `ids.device`, with no host copy.

        The range is checked on CPU only: on an accelerator the check would force a sync, and an
        out-of-range id there trips the indexing kernel's own device-side assert instead.
        """
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be int32 or int64, got {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel():
            self._check_range(int(ids.min()), int(ids.max()))
        lookup = self._device_lookups.get(ids.device)
        if lookup is None:
            lookup = torch.from_numpy(self.lookup).to(ids.device)
            self._device_lookups[ids.device] = lookup
        return lookup[ids]

    def map_pad(self, pad_id: int) -> int:
        """The canonical pad id: the pad is compressed like any token (ENGRAM.md §2)."""
        self._check_range(pad_id, pad_id)
        return int(self.lookup[pad_id])

    def save(self, path: str | PathLike) -> None:
        np.savez(path, lookup=self.lookup, num_canonical=np.int64(self.num_canonical))

    @classmethod
    def load(cls, path: str | PathLike) -> "TokenizerCompression":
        with np.load(path) as data:
            return cls(data["lookup"], int(data["num_canonical"]))

    def _check_range(self, low: int, high: int) -> None:
        bad = low if low < 0 else high if high >= self.raw_vocab_size else None
        if bad is not None:
            raise ValueError(f"token id {bad} out of range [0, {self.raw_vocab_size})")
