"""The progress file of a resumable import: which chunks are in the table, durably.

A JSON file, replaced atomically (written beside, fsynced, renamed, directory fsynced) after each
chunk the shards acknowledged: {"identity": what is imported where, "digests": sha256 of each
finished chunk, in order}. Chunks go in order, so the finished ones are a prefix; a re-run starts
at the first unfinished chunk, and redoes at most the one that was in flight when it stopped
(writing rows sets them, so a chunk written twice changes nothing). A re-run whose identity
differs (another file, tensor, table or chunk size) is refused: its chunks would not be these.
"""
from __future__ import annotations

import json
import os


class ImportMismatch(ValueError):
    """A progress file records an import of something else than the one asked for."""


class ImportProgress:
    """The progress file at `path` of the import `identity` (a JSON-able dict)."""

    def __init__(self, path: str, identity: dict) -> None:
        self.path, self.identity = path, identity
        self.digests: list[str] = []
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved["identity"] != identity:
                differs = sorted(k for k in identity if saved["identity"].get(k) != identity[k])
                raise ImportMismatch(
                    f"progress file {path} records another import (differs in {', '.join(differs)}: "
                    f"{ {k: saved['identity'].get(k) for k in differs} }); delete it to start this "
                    f"import afresh, or name another with --progress")
            self.digests = list(saved["digests"])
        else:
            self._save({})  # now: a folder it cannot be written in fails before any row is sent

    @property
    def chunks_done(self) -> int:
        return len(self.digests)

    def finish(self, chunk: int, digest: str) -> None:
        """Records chunk `chunk` (the next one) as in the table, durably, before returning."""
        assert chunk == len(self.digests), f"chunk {chunk} finished after {len(self.digests)} chunks"
        self.digests.append(digest)
        self._save({})

    def complete(self, checksum: str) -> None:
        """Records the checksum the shards' rows were verified against (the import is done)."""
        self._save({"checksum": checksum})

    def _save(self, extra: dict) -> None:
        partial = self.path + ".partial"
        with open(partial, "w") as f:
            json.dump({"identity": self.identity, "digests": self.digests, **extra}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
