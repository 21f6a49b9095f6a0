"""Manifest: what a checkpoint directory holds, and the proof that it is whole.

A checkpoint is a directory (memory_service/durability/checkpoint.py writes it):

    manifest.json                       this file, written last
    shard-0000-of-0002/<table>.rows.npy one file per table per shard: its written rows
    shard-0000-of-0002/<table>.log.npy  the table's step log (learning rate of every step)
    hot-0000-of-0001/...                a hot shard's rows (their authoritative home at the save)
    dense.pt                            optional: the trainer's dense model, optimizers, data state

The manifest (JSON: readable with any tool, and small: rows never go in it) names the step, the
tables with their configs, every shard's files and every other file, each with its size and
sha256, and ends with a sha256 of its own content. It is written to a temporary file, fsynced
and renamed into place only after every file it names was written and fsynced, inside a
temporary directory that is itself renamed to the checkpoint's name last: a directory without
a manifest, or whose files do not match it, is a save that did not finish (or a damaged copy),
and `read` / `verify` refuse it with CheckpointCorrupt naming what is wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from memory_service.config import TableConfig
from memory_service.errors import CheckpointCorrupt

FORMAT = "engram-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
ROLES = ("cold", "hot")
KINDS = ("rows", "log", "dense")
_BLOCK = 1 << 20  # bytes hashed per read


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: `path` relative to its root ('/'-separated), its size and
    sha256; for a shard's file the table it belongs to, its kind (rows, log) and rows held."""

    path: str
    bytes: int
    sha256: str
    kind: str
    table: str = ""
    rows: int = 0

    def __post_init__(self) -> None:
        parts = PurePosixPath(self.path).parts
        if not parts or self.path.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in self.path:
            raise ValueError(f"checkpoint file path {self.path!r} must be relative, inside the checkpoint")
        if self.kind not in KINDS:
            raise ValueError(f"checkpoint file {self.path!r}: kind {self.kind!r} must be one of {KINDS}")
        if self.bytes < 0 or self.rows < 0 or len(self.sha256) != 64:
            raise ValueError(f"checkpoint file {self.path!r}: bad size {self.bytes}, rows {self.rows} or sha256")


@dataclass(frozen=True)
class ShardEntry:
    """The files shard `shard_id` of `num_shards` (cold or hot) wrote."""

    role: str
    shard_id: int
    num_shards: int
    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES or not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"checkpoint shard {self.role} {self.shard_id} of {self.num_shards} is not a shard")

    def file(self, table: str, kind: str) -> FileEntry:
        """The shard's file of `kind` for `table` (CheckpointCorrupt if the manifest names none)."""
        for f in self.files:
            if f.table == table and f.kind == kind:
                return f
        raise CheckpointCorrupt(f"checkpoint {self.role} shard {self.shard_id} of {self.num_shards} has no "
                                f"{kind} file for table {table!r}")


@dataclass(frozen=True)
class TableEntry:
    """A table as saved: its config, step, and rows and bytes summed over its shards."""

    config: TableConfig
    step: int
    rows: int
    bytes: int

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Manifest:
    """A whole checkpoint at table step `step` of a cluster of `num_shards` cold and `num_hot`
    hot shards (see the module docstring)."""

    step: int
    num_shards: int
    num_hot: int
    tables: tuple[TableEntry, ...]
    shards: tuple[ShardEntry, ...]
    files: tuple[FileEntry, ...] = ()  # files beside the shards' (dense.pt)
    created: str = ""  # ISO time of the save, for people

    def __post_init__(self) -> None:
        if self.step < 0 or self.num_shards < 0 or self.num_hot < 0:
            raise ValueError(f"checkpoint step {self.step}, num_shards {self.num_shards} and num_hot "
                             f"{self.num_hot} must be >= 0")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError("checkpoint names a table twice")
        paths = [f.path for f in self.all_files()]
        if len(set(paths)) != len(paths):
            raise ValueError("checkpoint names a file twice")
        for shard in self.shards:
            for f in shard.files:
                if f.table not in names:
                    raise ValueError(f"checkpoint file {f.path!r} belongs to table {f.table!r}, which it does not list")

    def all_files(self) -> list[FileEntry]:
        return [f for shard in self.shards for f in shard.files] + list(self.files)

    def table(self, name: str) -> TableEntry:
        return next(t for t in self.tables if t.name == name)

    @property
    def nbytes(self) -> int:
        return sum(f.bytes for f in self.all_files())

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        body = {"format": FORMAT, "version": VERSION, "step": self.step, "num_shards": self.num_shards,
                "num_hot": self.num_hot, "created": self.created,
                "tables": [{"config": t.config.to_dict(), "step": t.step, "rows": t.rows, "bytes": t.bytes}
                           for t in self.tables],
                "shards": [{"role": s.role, "shard_id": s.shard_id, "num_shards": s.num_shards,
                            "files": [dataclasses.asdict(f) for f in s.files]} for s in self.shards],
                "files": [dataclasses.asdict(f) for f in self.files]}
        return {**body, "sha256": _digest(body)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "Manifest":
        """The manifest `to_dict` wrote; CheckpointCorrupt if it is not one or was changed."""
        try:
            body = {k: v for k, v in data.items() if k != "sha256"}
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r} is not {FORMAT!r}")
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}: this build reads version {VERSION}")
            if data.get("sha256") != _digest(body):
                raise ValueError("its sha256 does not match its content (edited or damaged)")
            return cls(
                step=body["step"], num_shards=body["num_shards"], num_hot=body["num_hot"], created=body["created"],
                tables=tuple(TableEntry(TableConfig.from_dict(t["config"]), t["step"], t["rows"], t["bytes"])
                             for t in body["tables"]),
                shards=tuple(ShardEntry(s["role"], s["shard_id"], s["num_shards"],
                                        tuple(FileEntry(**f) for f in s["files"])) for s in body["shards"]),
                files=tuple(FileEntry(**f) for f in body["files"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointCorrupt(f"{where} is not a valid checkpoint manifest: {err}") from None

    # -- files ------------------------------------------------------------------------------------
    def write(self, root: str | Path) -> None:
        """Writes `root`/manifest.json atomically and durably (temp file, fsync, rename, fsync
        of the directory)."""
        root = Path(root)
        tmp = root / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(root / MANIFEST)
        fsync_dir(root)

    @classmethod
    def read(cls, root: str | Path) -> "Manifest":
        """The manifest of checkpoint `root`, checked (not the files: `verify`)."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise CheckpointCorrupt(f"checkpoint {str(root)!r} is not a directory{_partial_hint(root)}")
        if not path.is_file():
            raise CheckpointCorrupt(f"checkpoint {str(root)!r} has no {MANIFEST}: it is not a complete checkpoint "
                                    f"(a save that did not finish leaves such a directory){_partial_hint(root)}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointCorrupt(f"{path} cannot be read as JSON: {err}") from None
        if not isinstance(data, dict):
            raise CheckpointCorrupt(f"{path} is not a checkpoint manifest (a JSON object)")
        return cls.from_dict(data, str(path))

    def verify(self, root: str | Path, files: list[FileEntry] | None = None) -> None:
        """Checks that `files` (default: all) exist under `root` with their size and sha256:
        CheckpointCorrupt naming the first that does not."""
        for entry in self.all_files() if files is None else files:
            verify_file(Path(root), entry)


def verify_file(root: Path, entry: FileEntry) -> None:
    """CheckpointCorrupt unless `root`/entry.path holds the bytes the manifest says."""
    path = root / entry.path
    try:
        size = path.stat().st_size
    except OSError:
        raise CheckpointCorrupt(f"checkpoint file {entry.path} is missing from {root}") from None
    if size != entry.bytes:
        raise CheckpointCorrupt(f"checkpoint file {entry.path} has {size} bytes, the manifest says {entry.bytes} "
                                f"(truncated or replaced)")
    if (digest := sha256_file(path)) != entry.sha256:
        raise CheckpointCorrupt(f"checkpoint file {entry.path} is damaged: sha256 {digest[:16]}.. differs from "
                                f"the manifest's {entry.sha256[:16]}..")


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (never whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Makes the directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _partial_hint(root: Path) -> str:
    """Names the unfinished saves (temporary directories) beside `root`, if any."""
    partial = sorted(p.name for p in root.parent.glob(f"{root.name}{PARTIAL}*")) if root.parent.is_dir() else []
    return f"; unfinished saves beside it: {', '.join(partial)}" if partial else ""


PARTIAL = ".partial-"  # a save writes into "<name>.partial-<random>" and renames it to "<name>" last
