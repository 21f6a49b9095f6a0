"""Why collision shares come from exact lookup registers and not from the slot sample alone.

On the corpus's validation split (the interpreter's stdlib, as the tests use), for Engram tables
that collide a lot (~20k rows) and little (~2M rows), this prints the exact share of lookups that
land in a slot holding >= 2 distinct N-grams, then what a slot sample (chosen by a hash of the row
id, every N-gram of a sampled slot seen) would report at several rates, over 32 different sample
hashes: the median and worst relative error. The lookups follow a Zipf law, so a sample's estimate
is decided by which heavy slots it happens to hold; the mean distinct N-grams per slot, which
weighs slots equally, is shown beside it for contrast.

    PYTHONPATH=. python bench/bench_collisions.py       # ~1 min on one core
"""
from __future__ import annotations

import numpy as np

from memory_service.ids import mix64
from trainer.data import Corpus, CorpusConfig
from trainer.hashing import NgramHashConfig, NgramHasher
from trainer.tokenizer_compression import TokenizerCompression

RATES = (1 / 16, 1 / 4, 1 / 2)
NUM_SALTS = 32


def per_slot(rows: np.ndarray, grams: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Lookups (m,) and distinct N-grams (m,) per slot, from row ids (n,) and N-gram keys (n,)."""
    lookups = np.bincount(rows, minlength=num_rows)
    pairs = np.unique(np.stack([rows, grams]), axis=1)  # (2, distinct pairs)
    return lookups, np.bincount(pairs[0], minlength=num_rows)


def main() -> None:
    corpus = Corpus.load(CorpusConfig())
    compression = TokenizerCompression.from_tokenizer(corpus.tokenizer)
    tokens = compression.lookup[np.asarray(corpus.val, dtype=np.int64)]  # (n,)
    pad = compression.map_pad(corpus.pad_id)
    prev1, prev2 = np.r_[pad, tokens[:-1]], np.r_[pad, pad, tokens[:-2]]
    keys = {2: prev1 * 2**20 + tokens, 3: (prev2 * 2**20 + prev1) * 2**20 + tokens}  # exact N-grams
    print(f"validation split: {len(tokens):,} lookups per table; {NUM_SALTS} sample hashes per rate")
    print(f"{'table':>16} {'exact share':>11} | " + " | ".join(
        f"rate {r:.3g}: share err med/worst, mean err worst" for r in RATES))
    for size in (20_000, 2_000_000):
        hasher = NgramHasher(NgramHashConfig(vocab_size=compression.num_canonical, table_sizes=(size, size),
                                             max_ngram=3, heads_per_ngram=1, layer_ids=(0,), pad_id=pad))
        rows = hasher.hash(tokens[None, :], 0)[0]  # (n, 2)
        for j, n in enumerate((2, 3)):
            num_rows = hasher.table_sizes(0)[j]
            lookups, distinct = per_slot(rows[:, j], keys[n], num_rows)
            touched = distinct > 0
            share = lookups[distinct >= 2].sum() / lookups.sum()
            mean = distinct[touched].mean()
            cells = []
            for rate in RATES:
                share_err, mean_err = [], []
                for salt in range(NUM_SALTS):
                    h = mix64(np.arange(num_rows, dtype=np.uint64) ^ mix64(np.array([salt + 1]))[0])
                    sample = h < np.uint64(int(rate * 2**64))
                    lk, ds = lookups[sample], distinct[sample]
                    share_err.append(lk[ds >= 2].sum() / lk.sum() / share - 1)
                    mean_err.append(ds[ds > 0].mean() / mean - 1)
                share_err, mean_err = np.abs(share_err), np.abs(mean_err)
                cells.append(f"{np.median(share_err):6.1%} / {share_err.max():6.1%}, {mean_err.max():5.1%}")
            print(f"{f'{num_rows:,} n={n}':>16} {share:11.3%} | " + " | ".join(cells))
    print("the service reports the exact share from its lookup registers (tests/memory_service/ops/test_collisions.py)")


if __name__ == "__main__":
    main()
