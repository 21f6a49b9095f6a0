"""Checkpoints of a tables cluster (and, optionally, of the dense model that trains with it).

    manifest = save_checkpoint("ckpt/step-1000", client, step=1000, model=model, optimizers=[adamw],
                               extra={"data": loader_state})
    restored = restore_checkpoint("ckpt/step-1000", new_client)       # tables, onto any shard count
    extra = load_dense("ckpt/step-1000", model, [adamw])                # after building the model

A checkpoint is consistent at one table step: every shard saves only if every table it holds is
at that step, complete (FailedPrecondition otherwise), and the hot shards' migration is paused
for the whole save, so no row is between two shards, or saved by both, while they write. The
shards write their own files in parallel on a filesystem they share with the driver (the local
disk on one machine; a shared volume mounted at the same path in every pod on Kubernetes:
deploy/README.md); the driver writes the dense state and, last, the manifest
(memory_service/durability/manifest.py) with every file's sha256, inside a temporary directory it renames
to the checkpoint's name at the end. A crash leaves only a "<name>.partial-*" directory, which
nothing takes for a checkpoint.

Restore goes onto a freshly launched cluster, of any number of cold and hot shards, that does not
hold the checkpoint's tables: each cold shard reads the rows it is home of (row r: cold shard
r % N) from the files of the shards that saved them, checks those files' sha256 first, and the
tables continue from the saved step (step log, optimizer state and each row's last step). The
driver checks that the shards took every saved row; if anything fails it drops the tables it
restored, so a failed restore leaves the cluster as it was.

The dense part is a torch file (`dense.pt`: the model's and optimizers' state_dicts and `extra`),
read with torch.load(weights_only=True) after its sha256 is checked.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from memory_service.errors import CheckpointCorrupt, FailedPrecondition, MemoryServiceError, error_of_status
from memory_service.durability.manifest import (PARTIAL, FileEntry, Manifest, ShardEntry, TableEntry, fsync_dir,
                                     sha256_file, verify_file)
from memory_service.rpc import memory_pb2

DENSE = "dense.pt"
STEP_DIR = re.compile(r"step-(\d+)")
# numpy arrays and scalars in a state_dict (the in-process table optimizer's step logs) and frozensets
# in configs unpickle through these; torch.load(weights_only=True) refuses every other global.
_SAFE_GLOBALS = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype, frozenset,
                 *(getattr(np.dtypes, name) for name in np.dtypes.__all__)]


@dataclass(frozen=True)
class CheckpointOptions:
    """Deadlines of the checkpoint protocol. `wait_s`: how long shards wait for the step's commits
    (data-parallel workers' parts) before refusing; `lease_s`: how long a migration pause lasts
    unless renewed (the driver renews it every lease_s / 3 while it saves, so a driver that dies
    mid-save holds migration for at most lease_s); `rpc_timeout_s`: the deadline of one shard's
    save or restore."""

    wait_s: float = 60.0
    lease_s: float = 30.0
    pause_timeout_s: float = 60.0
    rpc_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.wait_s < 0 or not self.lease_s > 0 or self.pause_timeout_s < 0 or not self.rpc_timeout_s > 0:
            raise ValueError(f"checkpoint deadlines must be positive: {self}")


@dataclass(frozen=True)
class Restored:
    """What restore_checkpoint did: the checkpoint's manifest and the `extra` it was saved with."""

    manifest: Manifest
    extra: dict | None


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where a run that checkpoints into `directory` keeps its checkpoint of `step`."""
    return Path(directory) / f"step-{step:08d}"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint (manifest present) of the highest step among `directory`'s
    step-* folders; unfinished saves are skipped. None if there is none."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step-*")
             if (m := STEP_DIR.fullmatch(p.name)) and (p / "manifest.json").is_file()]
    return max(found)[1] if found else None


# -- save -------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, client=None, step: int | None = None, *, model: torch.nn.Module | None = None,
                    optimizers: Sequence[torch.optim.Optimizer] = (), extra: dict | None = None,
                    tables: Sequence[str] = (), overwrite: bool = False,
                    options: CheckpointOptions = CheckpointOptions()) -> Manifest:
    """Writes a checkpoint to directory `path`: the tables of `client`'s cluster (a MemoryClient;
    `tables` names some, default all) at table step `step` (default: the step they are all at),
    and, when given, the dense `model`, `optimizers` and `extra` (torch-serialisable, e.g. the
    data loader's position). Returns the manifest. `path` must not exist, unless `overwrite`:
    then the old checkpoint is replaced once the new one is whole."""
    final = Path(path).absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {str(final)!r} exists already: give each checkpoint a new directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}{PARTIAL}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if client is not None:
            step = _current_step(client, tables) if step is None else step
            shards, table_entries = _save_tables(client, tmp, step, list(tables), options)
            num_shards, num_hot = client.num_cold, client.num_hot
        else:
            shards, table_entries, num_shards, num_hot = (), (), 0, 0
        dense = ()
        if model is not None or optimizers or extra is not None:
            dense = (_save_dense(tmp, model, optimizers, extra),)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        manifest = Manifest(step or 0, num_shards, num_hot, table_entries, shards, dense, created)
        manifest.write(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _move_into_place(tmp: Path, final: Path) -> None:
    """Renames the whole checkpoint `tmp` to `final`; an old `final` is first renamed aside (a
    crash between the renames leaves no checkpoint under that name, never a mixed one), then
    deleted."""
    old = None
    if final.exists():
        old = final.parent / f"{final.name}.replaced-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _current_step(client, tables: Sequence[str]) -> int:
    """The step every (named) table is at on every shard; FailedPrecondition if they differ."""
    distinct = sorted({int(t.step) for shard in client.stats() for t in shard.tables if not tables or t.name in tables})
    if len(distinct) > 1:
        raise FailedPrecondition(f"the tables are at different steps {distinct}: name the step (or the tables) "
                                 f"to checkpoint")
    return distinct[0] if distinct else 0


def _save_tables(client, tmp: Path, step: int, tables: list[str], options: CheckpointOptions
                 ) -> tuple[tuple[ShardEntry, ...], tuple[TableEntry, ...]]:
    """Every shard writes its part with migration paused; returns the parts and the tables."""
    request = memory_pb2.CheckpointSaveRequest(path=str(tmp), step=step, tables=tables, wait_seconds=options.wait_s)
    with _migration_paused(client, options):
        replies = _call_all(client, "CheckpointSave", request, options.rpc_timeout_s)
    shards = tuple(ShardEntry(r.role, r.shard_id, r.num_shards,
                              tuple(FileEntry(f.path, f.bytes, f.sha256, f.kind, f.table, f.rows) for f in r.files))
                   for r in replies)
    names = sorted({f.table for f in shards[0].files})
    for shard in shards:
        if sorted({f.table for f in shard.files}) != names:
            raise FailedPrecondition(f"{shard.role} shard {shard.shard_id} holds tables "
                                     f"{sorted({f.table for f in shard.files})}, shard 0 holds {names}")
        for name in names:  # every shard took every step's commit: their step logs are one
            if shard.file(name, "log").sha256 != shards[0].file(name, "log").sha256:
                raise FailedPrecondition(f"the shards' step logs of table {name!r} differ")
    entries = tuple(TableEntry(client.table(name), step, sum(s.file(name, "rows").rows for s in shards),
                               sum(f.bytes for s in shards for f in s.files if f.table == name))
                    for name in names)
    return shards, entries


def _save_dense(tmp: Path, model, optimizers, extra) -> FileEntry:
    path = tmp / DENSE
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict() if model is not None else None,
                    "optimizers": [opt.state_dict() for opt in optimizers], "extra": extra}, f)
        f.flush()
        os.fsync(f.fileno())
    return FileEntry(DENSE, path.stat().st_size, sha256_file(path), "dense")


@contextmanager
def _migration_paused(client, options: CheckpointOptions) -> Iterator[None]:
    """Migration paused on every hot shard of `client` for the block (the pause renewed every
    lease_s / 3), resumed after; after a clean block, FailedPrecondition if a pause did not hold
    throughout (a renewal came too late and a round ran)."""
    pause = memory_pb2.CheckpointPauseRequest(pause=True, lease_seconds=options.lease_s,
                                              timeout_seconds=options.pause_timeout_s)
    deadline = options.pause_timeout_s + 30
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(options.lease_s / 3):
            try:
                _call_all(client, "CheckpointPause", pause, deadline, hot_only=True)
            except MemoryServiceError:
                pass  # a lapsed pause shows at the resume (held is False), and the save is refused

    renewer = threading.Thread(target=renew, name="engram-checkpoint-lease", daemon=True)
    try:
        _call_all(client, "CheckpointPause", pause, deadline, hot_only=True)
        renewer.start()
        yield
    finally:
        stop.set()
        if renewer.is_alive():
            renewer.join()
        replies = _call_all(client, "CheckpointPause", memory_pb2.CheckpointPauseRequest(pause=False), deadline,
                            hot_only=True)
    if not all(r.held for r in replies):
        raise FailedPrecondition("migration ran during the checkpoint (its pause lapsed before a renewal): rows "
                                 "may have moved between the shards' saves")


def _call_all(client, rpc: str, request, timeout: float, hot_only: bool = False, stubs=None) -> list:
    """`rpc` on every shard (or the hot ones) at once; waits for all, then raises the first error
    as the service error of its status."""
    stubs = stubs if stubs is not None else client.stubs[client.num_cold:] if hot_only else client.stubs
    if not stubs:
        return []
    with ThreadPoolExecutor(max_workers=len(stubs)) as pool:
        futures = [pool.submit(getattr(stub, rpc), request, timeout=timeout) for stub in stubs]
    replies, first = [], None
    for f in futures:
        try:
            replies.append(f.result())
        except grpc.RpcError as err:
            first = first or error_of_status(err.code().name, f"{rpc}: {err.details()}")
    if first is not None:
        raise first
    return replies


# -- restore ----------------------------------------------------------------------------------------
def restore_checkpoint(path: str | Path, client=None, *, model: torch.nn.Module | None = None,
                       optimizers: Sequence[torch.optim.Optimizer] = (), replace: bool = False,
                       options: CheckpointOptions = CheckpointOptions()) -> Restored:
    """Restores checkpoint `path`: its tables onto `client`'s cluster (which must not hold them,
    unless `replace`: then the cluster's tables of those names are dropped first, as a run
    resumed on the tables cluster it trained on needs), then, when given, the `model`'s and
    `optimizers`' states. Returns the manifest and `extra`. CheckpointCorrupt for an incomplete or
    damaged checkpoint, before anything changes."""
    root = Path(path).absolute()
    manifest = Manifest.read(root)
    for entry in manifest.files:  # the dense part too is checked before anything changes
        verify_file(root, entry)
    if client is not None and manifest.tables:
        _restore_tables(root, manifest, client, options, replace)
    return Restored(manifest, _load_dense(root, model, optimizers, manifest, verify=False))


def _restore_tables(root: Path, manifest: Manifest, client, options: CheckpointOptions, replace: bool) -> None:
    names = {t.name for t in manifest.tables}
    listed = _call_all(client, "ListTables", memory_pb2.ListTablesRequest(), options.pause_timeout_s)
    held = sorted(names & {name for reply in listed for name in reply.names})
    if held and not replace:
        raise FailedPrecondition(f"the cluster holds table {held[0]!r} of the checkpoint already: restore onto a "
                                 f"cluster without the checkpoint's tables")
    for name in held:  # replace: the checkpoint's state of these tables wins
        client.drop_table(name)
    try:
        with _migration_paused(client, options):
            replies = _call_all(client, "CheckpointRestore", memory_pb2.CheckpointRestoreRequest(path=str(root)),
                                options.rpc_timeout_s)
        for table in manifest.tables:
            taken = sum(t.rows for r in replies for t in r.tables if t.table == table.name)
            if taken != table.rows:
                raise CheckpointCorrupt(f"table {table.name!r}: the shards took {taken} rows, the checkpoint "
                                        f"holds {table.rows}: a row was saved twice")
    except BaseException:
        _drop_restored(client, names, options)
        raise


def _drop_restored(client, names: set[str], options: CheckpointOptions) -> None:
    """Drops the tables `names` wherever a failed restore created them."""
    listed = _call_all(client, "ListTables", memory_pb2.ListTablesRequest(), options.pause_timeout_s)
    for stub, reply in zip(client.stubs, listed):
        for name in sorted(names & set(reply.names)):
            stub.DropTable(memory_pb2.DropTableRequest(name=name), timeout=options.pause_timeout_s)


def load_dense(path: str | Path, model: torch.nn.Module | None = None,
               optimizers: Sequence[torch.optim.Optimizer] = (), manifest: Manifest | None = None) -> dict | None:
    """Loads the checkpoint's dense state into `model` and `optimizers` (as many as it saved)
    and returns its `extra` (None for a checkpoint without a dense part)."""
    root = Path(path).absolute()
    return _load_dense(root, model, optimizers, manifest or Manifest.read(root))


def _load_dense(root: Path, model, optimizers, manifest: Manifest, verify: bool = True) -> dict | None:
    if not any(f.kind == "dense" for f in manifest.files):
        if model is not None or optimizers:
            raise ValueError(f"checkpoint {str(root)!r} holds no dense model or optimizer state")
        return None
    saved = dense_state(root, manifest, verify)
    apply_dense(saved, model, optimizers)
    return saved["extra"]


def dense_state(path: str | Path, manifest: Manifest | None = None, verify: bool = True) -> dict:
    """The checkpoint's dense file {model, optimizers, extra}, checked against the manifest (for
    readers that build the model from `extra` first, then `apply_dense`)."""
    root = Path(path).absolute()
    manifest = manifest or Manifest.read(root)
    entry = next((f for f in manifest.files if f.kind == "dense"), None)
    if entry is None:
        raise ValueError(f"checkpoint {str(root)!r} holds no dense model or optimizer state")
    return _load_torch(root, entry, verify)


def apply_dense(saved: dict, model: torch.nn.Module | None = None,
                optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Loads a `dense_state` into `model` and `optimizers` (as many as were saved)."""
    if model is not None:
        if saved["model"] is None:
            raise ValueError("the checkpoint holds no model state")
        model.load_state_dict(saved["model"])
    if optimizers and len(optimizers) != len(saved["optimizers"]):
        raise ValueError(f"the checkpoint holds {len(saved['optimizers'])} optimizer states, "
                         f"{len(optimizers)} optimizers given")
    for opt, state in zip(optimizers, saved["optimizers"]):
        opt.load_state_dict(state)


def _load_torch(root: Path, entry: FileEntry, verify: bool = True) -> dict:
    if verify:
        verify_file(root, entry)
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        return torch.load(root / entry.path, map_location="cpu", weights_only=True)


# -- inspect ----------------------------------------------------------------------------------------
def inspect_checkpoint(path: str | Path, verify: bool = True) -> Manifest:
    """The checkpoint's manifest, after checking every file's size and sha256 (`verify`)."""
    root = Path(path).absolute()
    manifest = Manifest.read(root)
    if verify:
        manifest.verify(root)
    return manifest


def summary(manifest: Manifest) -> str:
    """Lines for people: step, shards, tables with rows and bytes, and the other files."""
    lines = [f"step {manifest.step}, saved {manifest.created or '?'} by {manifest.num_shards} cold + "
             f"{manifest.num_hot} hot shards: {len(manifest.tables)} tables, "
             f"{sum(t.rows for t in manifest.tables):,} rows, {manifest.nbytes:,} bytes in "
             f"{len(manifest.all_files())} files"]
    for t in manifest.tables:
        cfg = t.config
        lines.append(f"  {t.name}: {t.rows:,} of {cfg.num_rows:,} rows x {cfg.width} ({cfg.optimizer.kind}), "
                     f"{t.bytes:,} bytes")
    for f in manifest.files:
        lines.append(f"  {f.path}: {f.bytes:,} bytes ({f.kind})")
    return "\n".join(lines)
