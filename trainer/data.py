"""Training corpus: local text/source files -> byte-level BPE token ids, cached on disk.

Nothing is downloaded. The default corpus is the running interpreter's own standard-library
`.py` sources (~700 files, ~12 MB on CPython 3.11), so every machine with the same Python has
the same data. Any folder of text or source files works the same way (`corpus_dir`).

The split is by file, never by position: a file is held out iff
`zlib.crc32(relative_posix_path) % 100 < val_percent` (`is_val_file`). A hash of the path keeps
a file on the same side when others are added or removed, and no file is in both splits.
The tokenizer is trained on the train files only, so validation text is truly unseen.

Cache layout, under `<cache_dir>/<corpus key>/`: `tokenizer.json`, `train.bin`, `val.bin`
(flat uint16 ids, uint32 above 65536 ids; each file's ids followed by the end-of-text id, in
sorted path order) and `meta.json`, written last so its presence marks a complete build.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
MAX_VOCAB_SIZE = 2**32  # ids are stored as uint32 at widest
DEFAULT_CACHE_ROOT = "~/.cache/engram-memory"
DEFAULT_SUFFIXES = frozenset(
    {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".go", ".rs", ".java"})
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
CACHE_FORMAT = 1  # part of the cache key: bump when the build changes so old caches are not reused
_ENCODE_CHUNK = 64  # files per encode_batch call: enough to use the tokenizer's threads


@dataclass(frozen=True, slots=True)
class CorpusConfig:
    """Which files make the corpus, how it is tokenized and split, and where the cache lives."""

    corpus_dir: str | None = None  # None = the interpreter's stdlib .py sources
    vocab_size: int = 8192  # requested BPE vocab; a small corpus may stop short of it
    val_percent: int = 5  # share of files (by path hash) held out for validation
    cache_dir: str | None = None  # cache root; the corpus key is appended. None = ~/.cache/engram-memory
    max_files: int | None = None  # keep the first N sorted paths (tests, quick runs)
    suffixes: frozenset[str] = DEFAULT_SUFFIXES  # file types taken from corpus_dir (stdlib: .py)
    max_file_bytes: int = 1_000_000  # larger files are skipped (generated data, not prose or code)

    def __post_init__(self) -> None:
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size={self.vocab_size} must be in [{MIN_VOCAB_SIZE}, "
                             f"{MAX_VOCAB_SIZE}] (256 byte tokens + {len(SPECIAL_TOKENS)} special)")
        if not 0 <= self.val_percent < 100:
            raise ValueError(f"val_percent={self.val_percent} must be in [0, 100) (train needs files)")
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(f"max_files={self.max_files} must be >= 1 or None")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes={self.max_file_bytes} must be >= 1")
        object.__setattr__(self, "suffixes", frozenset(self.suffixes))
        bad = sorted(s for s in self.suffixes if not s.startswith("."))
        if bad:
            raise ValueError(f"suffixes {bad} must start with '.' (e.g. '.py')")


def is_val_file(rel_path: str, val_percent: int) -> bool:
    """The split rule: held out iff crc32 of the relative posix path, mod 100, is < val_percent."""
    return zlib.crc32(rel_path.encode("utf-8")) % 100 < val_percent


def list_files(cfg: CorpusConfig) -> tuple[Path, list[str]]:
    """The corpus root and its files as sorted relative posix paths (before the UTF-8 check).

    Hidden and `__pycache__` folders are always skipped; for the stdlib also site-packages and
    test folders, which are huge, repetitive and partly deliberately malformed.
    """
    root = Path(cfg.corpus_dir or sysconfig.get_paths()["stdlib"]).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus_dir {str(root)!r} is not a directory")
    skip = STDLIB_SKIP_DIRS if cfg.corpus_dir is None else frozenset()
    suffixes = frozenset({".py"}) if cfg.corpus_dir is None else cfg.suffixes
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in skip and d != "__pycache__" and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if (path.suffix in suffixes and path.is_file()
                    and path.stat().st_size <= cfg.max_file_bytes):
                found.append(path.relative_to(root).as_posix())
    return root, sorted(found)[: cfg.max_files]


def corpus_key(cfg: CorpusConfig, root: Path, files: list[str]) -> str:
    """Short hash naming the cache: changes with the folder, any file's size or mtime, or the config."""
    stats = [(rel, st.st_size, st.st_mtime_ns) for rel in files for st in [(root / rel).stat()]]
    blob = json.dumps([CACHE_FORMAT, str(root), stats, cfg.vocab_size, cfg.val_percent])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids 0..vocab_size-1 (uint16 halves the cache size)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `texts`: any byte string encodes, and decodes back exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty())
    tok.train_from_iterator(texts, trainer)
    return tok


@dataclass(slots=True)
class Corpus:
    """Tokenized train and validation splits (flat id arrays, memory-mapped) and their tokenizer."""

    tokenizer: Tokenizer
    train: np.ndarray  # (N_train,) token ids, files in sorted path order, each followed by eot_id
    val: np.ndarray  # (N_val,)
    pad_id: int
    eot_id: int
    vocab_size: int  # the trained vocab (<= the requested size): the model's embedding rows
    num_train_files: int
    num_val_files: int

    def summary(self) -> str:
        """One line for the commands to print: split sizes, files and vocabulary."""
        return (f"corpus: {len(self.train):,} train / {len(self.val):,} held-out tokens "
                f"({self.num_train_files} / {self.num_val_files} files), vocab {self.vocab_size}")

    @classmethod
    def load(cls, cfg: CorpusConfig) -> Corpus:
        """Load the corpus from its cache, building it first (tokenizer + encoding) on a miss."""
        root, files = list_files(cfg)
        if not files:
            raise ValueError(f"no corpus files under {str(root)!r} with suffixes {sorted(cfg.suffixes)}")
        cache = Path(cfg.cache_dir or DEFAULT_CACHE_ROOT).expanduser() / corpus_key(cfg, root, files)
        if not (cache / "meta.json").exists():
            _build(cfg, root, files, cache)
        return cls._from_cache(cache)

    @classmethod
    def _from_cache(cls, cache: Path) -> Corpus:
        meta = json.loads((cache / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        return cls(tokenizer=Tokenizer.from_file(str(cache / "tokenizer.json")),
                   train=_map_tokens(cache / "train.bin", dtype, meta["num_train_tokens"]),
                   val=_map_tokens(cache / "val.bin", dtype, meta["num_val_tokens"]),
                   pad_id=meta["pad_id"], eot_id=meta["eot_id"], vocab_size=meta["vocab_size"],
                   num_train_files=meta["num_train_files"], num_val_files=meta["num_val_files"])


def _build(cfg: CorpusConfig, root: Path, files: list[str], cache: Path) -> None:
    """Train the tokenizer on the train files, encode both splits, then write meta.json last."""
    cache.mkdir(parents=True, exist_ok=True)
    val_files = [f for f in files if is_val_file(f, cfg.val_percent)]
    train_files = [f for f in files if not is_val_file(f, cfg.val_percent)]
    if not train_files:
        raise ValueError(f"all {len(files)} files fall in validation at val_percent={cfg.val_percent}")
    tok = train_tokenizer((text for _, text in _read_texts(root, train_files)), cfg.vocab_size)
    _write_atomic(cache / "tokenizer.json", tok.to_str())
    dtype = token_dtype(tok.get_vocab_size())
    num_train_files, num_train_tokens = _encode_split(tok, root, train_files, cache / "train.bin", dtype)
    num_val_files, num_val_tokens = _encode_split(tok, root, val_files, cache / "val.bin", dtype)
    meta = dict(corpus_dir=str(root), val_percent=cfg.val_percent, dtype=dtype.name,
                vocab_size=tok.get_vocab_size(), pad_id=tok.token_to_id(PAD_TOKEN),
                eot_id=tok.token_to_id(EOT_TOKEN), num_train_files=num_train_files,
                num_val_files=num_val_files, num_train_tokens=num_train_tokens,
                num_val_tokens=num_val_tokens)
    _write_atomic(cache / "meta.json", json.dumps(meta, indent=1))


def _read_texts(root: Path, files: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(path, text) of each file that decodes as UTF-8 and is not blank; the rest are skipped."""
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield rel, text


def _encode_split(tok: Tokenizer, root: Path, files: list[str], path: Path,
                  dtype: np.dtype) -> tuple[int, int]:
    """Write each file's ids then the end-of-text id to `path`; returns (num files, num tokens)."""
    eot_id = tok.token_to_id(EOT_TOKEN)
    num_files = num_tokens = 0
    tmp = _tmp_path(path)
    bar = tqdm(files, desc=f"encoding {path.stem}", unit="file", disable=None)
    texts = _read_texts(root, bar)
    with open(tmp, "wb") as f:
        while chunk := list(itertools.islice(texts, _ENCODE_CHUNK)):
            for enc in tok.encode_batch([text for _, text in chunk]):
                ids = np.asarray(enc.ids + [eot_id], dtype=dtype)
                ids.tofile(f)
                num_tokens += ids.size
            num_files += len(chunk)
    bar.close()
    os.replace(tmp, path)
    return num_files, num_tokens


def _tmp_path(path: Path) -> Path:
    # Per-process name: two builders of one cache never write the same temp file.
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a partial one


def _map_tokens(path: Path, dtype: np.dtype, num_tokens: int) -> np.ndarray:
    # np.memmap cannot map an empty file (val_percent=0 gives an empty val.bin).
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def _check_windows(tokens: np.ndarray, batch_size: int, context: int) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if batch_size < 1 or context < 1:
        raise ValueError(f"batch_size={batch_size} and context={context} must both be >= 1")
    if len(tokens) < context + 1:
        raise ValueError(f"split has {len(tokens)} tokens, fewer than context+1={context + 1}")


def _windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.array([tokens[s : s + context + 1] for s in starts], dtype=np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) inputs, (B, T) next tokens


class Batches:
    """Random training windows in a fixed order: the start offsets come from a numpy Generator
    seeded with `seed`, so runs with the same seed see the same data in the same order (the
    quality benchmark pairs models by data order)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int) -> None:
        _check_windows(tokens, batch_size, context)
        self.tokens, self.batch_size, self.context = tokens, batch_size, context
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) int64 and y (B, T) int64 = x shifted left by one token."""
        starts = self.rng.integers(0, len(self.tokens) - self.context, size=self.batch_size)
        return _windows(self.tokens, starts, self.context)

    def state_dict(self) -> dict:
        """The position in the batch order (the generator's state, plain data): a checkpoint
        saves it so a resumed run draws the batches the uninterrupted one would have."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def eval_batches(tokens: np.ndarray, batch_size: int, context: int,
                 max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to `max_batches` batches of non-overlapping windows from the start of the split.

    The same every call, so held-out losses compare across steps and models. The last batch is
    smaller when the split runs out of whole windows.
    """
    _check_windows(tokens, batch_size, context)
    if max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be >= 1")
    num_windows = min((len(tokens) - 1) // context, batch_size * max_batches)
    starts = np.arange(num_windows) * context
    return [_windows(tokens, starts[i : i + batch_size], context)
            for i in range(0, num_windows, batch_size)]
