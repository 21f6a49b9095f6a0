"""The write-ahead log of a cold shard: numbered msgpack records in append-only files.

A cold shard keeps its newest rows in DRAM (dirty arena rows) and writes them to LMDB only when they
are evicted or flushed; a crashed process loses them. So every change is first appended here (the
shard's `Journal` decides what a record holds), and a restarted shard replays the records after
the last flush on top of its LMDB files.

Files. `wal-<first seq, 20 digits>.log` in the directory `wal/` beside the LMDB files. Records are
numbered 1, 2, ... across files. A flush (a "checkpoint") writes the state up to record `marker`
into LMDB, then `rotate(marker)` deletes the files of records <= marker and starts the file
`marker + 1`; a crash anywhere in between leaves at most files whose records <= marker are skipped
on replay, so rotation needs no atomic rename.

Frames. Each record is `length (u32) | crc32 (u32) | msgpack payload`, the payload a map with
its "seq". A crash mid-append leaves a torn last frame (short or failing its crc): reading stops
there, and the record was never acknowledged. A bad frame anywhere else, or a gap in the
numbering, is damage, not a crash, and raises `WalCorrupt` rather than replaying around it.

Durability. `append` hands the frame to the OS (`flush`) before it returns: a killed process keeps
it (the page cache survives). With `fsync` it is also forced to disk (survives an OS crash too),
at the cost of a disk sync per request.
"""
from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

import msgpack

_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
_PREFIX, _SUFFIX = "wal-", ".log"
MAX_RECORD_BYTES = 1 << 31  # a frame claiming more is damage (the largest request is ~1 GiB of after-images)


class WalCorrupt(RuntimeError):
    """The log is damaged somewhere other than a torn last record (a crash mid-append)."""


def _name(first_seq: int) -> str:
    return f"{_PREFIX}{first_seq:020d}{_SUFFIX}"


class WriteAheadLog:
    """The log in `directory` (created if missing). Appends go to one open file; `read` replays."""

    def __init__(self, directory: str, fsync: bool = False) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory, self.fsync = directory, fsync
        self.last_seq = 0  # the last record appended (or read back)
        self.nbytes = 0  # bytes appended to the open file
        self._file = None

    def files(self) -> list[tuple[int, str]]:
        """(first seq, path) of every log file, oldest first."""
        out = []
        for name in os.listdir(self.directory):
            if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
                out.append((int(name[len(_PREFIX):-len(_SUFFIX)]), os.path.join(self.directory, name)))
        return sorted(out)

    def read(self, after: int) -> Iterator[dict]:
        """Every record with seq > `after`, in order, up to a torn last record. Sets `last_seq`
        to the last record read (at least `after`)."""
        self.last_seq = after
        files = self.files()
        for i, (first, path) in enumerate(files):
            is_last = i == len(files) - 1
            for record in self._frames(path, is_last):
                seq = record["seq"]
                if seq <= after:
                    continue
                if seq != self.last_seq + 1:
                    raise WalCorrupt(f"{path}: record {seq} follows record {self.last_seq}")
                self.last_seq = seq
                yield record

    @staticmethod
    def _frames(path: str, is_last: bool) -> Iterator[dict]:
        """The records of one file; a bad frame ends the last file (a torn append), else raises."""
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            bad = None
            if len(data) - at < _FRAME.size:
                bad = "a truncated frame header"
            else:
                length, crc = _FRAME.unpack_from(data, at)
                payload = data[at + _FRAME.size: at + _FRAME.size + length]
                if length > MAX_RECORD_BYTES or len(payload) < length:
                    bad = f"a frame of {length} bytes with {len(payload)} left"
                elif zlib.crc32(payload) != crc:
                    bad = "a frame failing its crc32"
            if bad is not None:
                if is_last:
                    return  # a crash mid-append: that record was never acknowledged
                raise WalCorrupt(f"{path}: {bad} at byte {at}, in a file that is not the last")
            yield msgpack.unpackb(payload, raw=False, strict_map_key=False)
            at += _FRAME.size + length

    def open(self, next_seq: int) -> None:
        """Starts the file whose first record will be `next_seq` (emptied if it exists: it can
        hold at most a torn record, since no record >= next_seq was acknowledged)."""
        self.close()
        self._file = open(os.path.join(self.directory, _name(next_seq)), "wb")
        self.last_seq, self.nbytes = next_seq - 1, 0
        if self.fsync:
            self._sync_directory()

    def append(self, record: dict) -> int:
        """Numbers `record` (sets its "seq"), appends it and hands it to the OS (and to the disk
        with `fsync`); returns its seq. The file must be open (`open`)."""
        assert self._file is not None, "WriteAheadLog.append before open"
        record["seq"] = self.last_seq + 1
        payload = msgpack.packb(record, use_bin_type=True)
        self._file.write(_FRAME.pack(len(payload), zlib.crc32(payload)))
        self._file.write(payload)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.last_seq += 1
        self.nbytes += _FRAME.size + len(payload)
        return self.last_seq

    def rotate(self, marker: int) -> None:
        """Records <= `marker` are in LMDB now: delete the files holding them, then start the
        next one. (Deleting first: a crash in between leaves no file, which replays as nothing
        after the marker, where a surviving old file could end in a torn record that is no longer
        the last one.)"""
        self.close()
        for first, path in self.files():
            if first <= marker:
                os.remove(path)
        self.open(marker + 1)

    def start_next(self) -> int:
        """Starts a new file for the records after the last one, keeping the older files; returns
        that last seq (the marker of a checkpoint in progress: `drop_through` it once LMDB holds
        everything up to it)."""
        marker = self.last_seq
        self.open(marker + 1)
        return marker

    def drop_through(self, marker: int) -> None:
        """Deletes the files whose records are all <= `marker` (every file before the open one
        that starts after it)."""
        for first, path in self.files():
            if first <= marker and (self._file is None or path != self._file.name):
                os.remove(path)
        if self.fsync:
            self._sync_directory()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
