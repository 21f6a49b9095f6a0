"""The checksum of a table's rows: sha256 over per-chunk sha256s of the rows as float32.

Each chunk of `chunk_rows` rows (the last one shorter) is hashed as float32 little-endian in row
order; the table's checksum is the sha256 of those digests in order, written
"sha256x<chunk_rows>:<hex>". Why chunks and not one sha256 over all rows: an import that stops and
is re-run keeps the digests of its finished chunks in its progress file, while a running sha256's
state cannot be saved, so a resumed import would have to read its finished chunks again; and a
verification that disagrees names the first chunk that differs. The same rows hashed with the
same chunk size give the same checksum wherever they come from (the file, the shards, an export).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def chunk_digest(rows: np.ndarray) -> str:
    """sha256 hex of rows (n, width) as float32 little-endian, row-major."""
    return digest_of_parts([rows])


def digest_of_parts(parts: Iterable[np.ndarray]) -> str:
    """`chunk_digest` of the rows the parts (k_i, width) make one after the other (read in parts,
    a chunk is never held whole)."""
    h = hashlib.sha256()
    for rows in parts:
        h.update(np.ascontiguousarray(rows, "<f4").data)
    return h.hexdigest()


def table_checksum(digests: list[str], chunk_rows: int) -> str:
    """The checksum of a table whose chunks of `chunk_rows` rows had `digests`, in order."""
    h = hashlib.sha256()
    for digest in digests:
        h.update(bytes.fromhex(digest))
    return f"sha256x{chunk_rows}:{h.hexdigest()}"
