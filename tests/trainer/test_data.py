"""Tests for trainer/data.py on real files in a temp folder: split rule, round trip, cache, batches."""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    Batches, Corpus, CorpusConfig, eval_batches, is_val_file, list_files, token_dtype)

VAL_PERCENT = 20
VOCAB = 300


def _text(i: int) -> str:
    words = ["def", "return", "memory", "engram", "table", "hash", "row", "shard", "token"]
    lines = [f"# file {i}: {' '.join(words[(i + k) % len(words)] for k in range(6))}"]
    lines += [f"def f_{i}_{k}(x):\n    return x * {k} + {i}  # ünïcode ✓" for k in range(i % 4 + 2)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A few dozen small .py/.txt/.md files, plus files the corpus must skip."""
    root = tmp_path / "src"
    for i in range(36):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod_{i}{('.py', '.txt', '.md')[i % 3]}").write_text(_text(i), encoding="utf-8")
    (root / "binary.py").write_bytes(b"\xff\xfe\x00bad utf-8")  # fails decode: skipped
    (root / "empty.py").write_text("")  # blank: skipped
    (root / "huge.txt").write_text("x" * 2_000)  # over max_file_bytes below: skipped
    (root / "image.png").write_bytes(b"\x89PNG")  # suffix not in the set: skipped
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.py").write_text("hidden = 1\n")  # hidden folder: skipped
    return root


def _cfg(corpus_dir: Path, tmp_path: Path, **kw) -> CorpusConfig:
    kw = dict(corpus_dir=str(corpus_dir), vocab_size=VOCAB, val_percent=VAL_PERCENT,
              cache_dir=str(tmp_path / "cache"), max_file_bytes=1_000) | kw
    return CorpusConfig(**kw)


def _kept(corpus_dir: Path) -> list[str]:
    """The files the corpus should contain, in its order (sorted relative posix paths)."""
    return sorted(p.relative_to(corpus_dir).as_posix() for p in corpus_dir.glob("pkg*/mod_*"))


def _documents(corpus: Corpus, tokens: np.ndarray) -> list[str]:
    """Split a flat id array at end-of-text ids and decode each document."""
    ends = np.flatnonzero(tokens == corpus.eot_id)
    assert ends.size and ends[-1] == len(tokens) - 1  # every document, the last too, ends in EOT
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [corpus.tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def test_split_is_by_file_with_the_crc32_rule(corpus_dir, tmp_path):
    corpus = Corpus.load(_cfg(corpus_dir, tmp_path))
    kept = _kept(corpus_dir)
    expect_val = [f for f in kept if zlib.crc32(f.encode()) % 100 < VAL_PERCENT]
    expect_train = [f for f in kept if f not in expect_val]
    assert expect_val and expect_train  # the fixture's file names put files on both sides
    assert [is_val_file(f, VAL_PERCENT) for f in kept] == [f in expect_val for f in kept]
    assert (corpus.num_train_files, corpus.num_val_files) == (len(expect_train), len(expect_val))
    # Each split decodes back to exactly its files' texts, in sorted path order.
    read = lambda files: [(corpus_dir / f).read_text(encoding="utf-8") for f in files]
    assert _documents(corpus, np.asarray(corpus.train)) == read(expect_train)
    assert _documents(corpus, np.asarray(corpus.val)) == read(expect_val)


def test_round_trip_of_one_file_and_token_ids(corpus_dir, tmp_path):
    corpus = Corpus.load(_cfg(corpus_dir, tmp_path))
    first_train = next(f for f in _kept(corpus_dir) if not is_val_file(f, VAL_PERCENT))
    text = (corpus_dir / first_train).read_text(encoding="utf-8")
    ids = corpus.tokenizer.encode(text).ids
    assert corpus.tokenizer.decode(ids) == text
    assert list(corpus.train[: len(ids) + 1]) == ids + [corpus.eot_id]
    assert corpus.train.dtype == np.uint16 and corpus.train.max() < corpus.vocab_size
    assert corpus.vocab_size <= VOCAB and corpus.eot_id != corpus.pad_id
    assert corpus.tokenizer.encode("<|endoftext|>").ids == [corpus.eot_id]


def test_second_load_hits_the_cache(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path)
    first = Corpus.load(cfg)
    [cache] = (tmp_path / "cache").iterdir()
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert set(mtimes) == {"tokenizer.json", "train.bin", "val.bin", "meta.json"}  # no temp files
    t0 = time.perf_counter()
    second = Corpus.load(cfg)
    assert time.perf_counter() - t0 < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_train_tokens"] == len(second.train) and meta["eot_id"] == second.eot_id


def test_changed_file_or_config_builds_a_new_cache(corpus_dir, tmp_path):
    Corpus.load(_cfg(corpus_dir, tmp_path))
    Corpus.load(_cfg(corpus_dir, tmp_path, vocab_size=VOCAB + 20))
    (corpus_dir / "pkg0" / "mod_0.py").write_text(_text(0) + "extra = 1\n")
    Corpus.load(_cfg(corpus_dir, tmp_path))
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_max_files_keeps_the_first_sorted_paths(corpus_dir, tmp_path):
    root, files = list_files(_cfg(corpus_dir, tmp_path, max_files=5))
    assert root == corpus_dir.resolve()
    _, all_files = list_files(_cfg(corpus_dir, tmp_path))
    assert files == all_files[:5] == sorted(all_files)[:5]
    assert "binary.py" in all_files and "huge.txt" not in all_files  # decode check comes later


def test_batches_are_deterministic_by_seed():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b, c = (Batches(tokens, batch_size=4, context=16, seed=s) for s in (7, 7, 8))
    xs_a, xs_b, xs_c = ([bt.next() for _ in range(3)] for bt in (a, b, c))
    for (xa, ya), (xb, yb) in zip(xs_a, xs_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(xs_a, xs_c))
    x, y = xs_a[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # tokens are positions


def test_batches_reach_the_last_token():
    tokens = np.arange(9, dtype=np.uint16)
    x, y = Batches(tokens, batch_size=3, context=8, seed=0).next()  # exactly context+1 tokens
    assert torch.equal(x, torch.arange(8).expand(3, 8)) and int(y.max()) == 8


def test_eval_batches_are_non_overlapping_windows_from_the_start():
    tokens = np.arange(100, dtype=np.uint16)
    batches = eval_batches(tokens, batch_size=4, context=10, max_batches=5)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]  # 99 // 10 = 9 whole windows
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(x.flatten(), torch.arange(90))
    assert torch.equal(torch.cat([y for _, y in batches]), x + 1)
    assert len(eval_batches(tokens, batch_size=2, context=10, max_batches=2)) == 2


@pytest.mark.parametrize("kw, match", [
    (dict(vocab_size=100), "vocab_size=100"),
    (dict(val_percent=100), "val_percent=100"),
    (dict(val_percent=-1), "val_percent=-1"),
    (dict(max_files=0), "max_files=0"),
    (dict(suffixes={"py"}), "'py'"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        CorpusConfig(**kw)


def test_load_and_batch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        Corpus.load(CorpusConfig(corpus_dir=str(tmp_path / "missing"), cache_dir=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no corpus files"):
        Corpus.load(CorpusConfig(corpus_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path)))
    short = np.arange(8, dtype=np.uint16)
    with pytest.raises(ValueError, match="8 tokens, fewer than context"):
        Batches(short, batch_size=2, context=8, seed=0)
    with pytest.raises(ValueError, match="8 tokens, fewer than context"):
        eval_batches(short, batch_size=2, context=8, max_batches=1)
    with pytest.raises(ValueError, match="max_batches=0"):
        eval_batches(short, batch_size=2, context=4, max_batches=0)


def test_token_dtype_widens_past_uint16():
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


@pytest.mark.slow
def test_stdlib_corpus(tmp_path):
    cfg = CorpusConfig(vocab_size=1024, max_files=200, cache_dir=str(tmp_path))
    corpus = Corpus.load(cfg)
    assert corpus.num_train_files > 0 and corpus.num_val_files > 0
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    assert corpus.vocab_size == 1024 and corpus.train.max() < 1024
    _, files = list_files(cfg)
    assert not any(part in {"test", "tests", "site-packages"}
                   for f in files for part in f.split("/"))
    x, y = Batches(corpus.train, batch_size=2, context=64, seed=0).next()
    assert x.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])
