"""Shared-memory fetch replies against a real shard process (issue 22, finding 4): the client owns
its /dev/shm reply file, so it can shrink it under the shard. The shard must answer an error (or
grow the file), never die of SIGBUS, and its rows must stay as they were."""
from __future__ import annotations

import os

import grpc
import numpy as np
import pytest

from memory_service.config import TableConfig
from memory_service.rpc import memory_pb2
from memory_service.wire import codec, reply_files
from tests.memory_service.server.served_shard import ShardProcess

EMB = TableConfig(name="emb", num_rows=100_000, width=64, seed=7)
IDS = np.arange(0, 16_384 * 4, 4)  # 16k ids: a 4 MiB fp32 reply
NBYTES = len(IDS) * EMB.width * 4

pytestmark = pytest.mark.skipif(not reply_files.available(), reason="needs a writable /dev/shm")


@pytest.fixture(scope="module")
def shard():
    with ShardProcess([EMB]) as proc:
        yield proc


def _fetch(stub, path: str | None) -> memory_pb2.FetchResponse:
    request = memory_pb2.FetchRequest(tables=[memory_pb2.TableIds(table="emb", ids=codec.encode_ids(IDS))])
    if path is not None:
        request.shared_memory.path = path
    return stub.Fetch(request, timeout=30)


def _file_rows(path: str) -> np.ndarray:
    """The reply file's first NBYTES as rows, read with pread (a mapping of a file the shard may
    have shrunk would be the test's own SIGBUS)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, NBYTES, 0)
    finally:
        os.close(fd)
    return np.frombuffer(data, "<f4").reshape(len(IDS), EMB.width)


@pytest.mark.parametrize("size", [0, 4096])
def test_a_reply_file_shrunk_by_its_client_cannot_kill_the_shard(shard, size):
    expected = codec.decode_rows(_fetch(shard.stub, None).tables[0].rows, len(IDS), EMB.width, "float32", "emb")
    digest = shard.digest()
    buf = reply_files.ReplyBuffer(NBYTES)
    try:
        _fetch(shard.stub, buf.path)  # the shard now has the file open
        np.testing.assert_array_equal(_file_rows(buf.path), expected)
        os.truncate(buf.path, size)  # what a hostile same-host client can do to its own file
        try:
            _fetch(shard.stub, buf.path)
        except grpc.RpcError as err:
            assert shard.alive(), f"the shard died ({shard.proc.returncode}) writing into a shrunk reply file"
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "does not fit" in err.details()
        assert shard.alive()
        assert os.path.getsize(buf.path) in (size, buf.size)  # refused, or grown by the shard's write
        os.truncate(buf.path, buf.size)  # valid again: rows as before
        _fetch(shard.stub, buf.path)
        np.testing.assert_array_equal(_file_rows(buf.path), expected)
        assert shard.digest() == digest
    finally:
        buf.close()


def test_a_reply_path_that_is_not_a_regular_file_is_refused(shard, tmp_path):
    path = os.path.join(reply_files.SHM_DIR, f"{reply_files.PREFIX}fifo-{os.getpid()}")
    os.mkfifo(path, 0o600)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _fetch(shard.stub, path)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert shard.alive()
    finally:
        os.unlink(path)


def test_the_shard_lets_go_of_reply_files_their_clients_deleted():
    files = reply_files.ReplyFiles()
    rows = np.ones((4, 8), np.float32)
    first, second = reply_files.ReplyBuffer(rows.nbytes), reply_files.ReplyBuffer(rows.nbytes)
    try:
        files.write(first.path, [(0, rows, "float32")])
        first.close()  # unlinks it: only the shard's fd keeps its pages
        files.write(second.path, [(0, rows, "float32")])  # opening another file sweeps the deleted
        assert list(files.files) == [second.path]
        np.testing.assert_array_equal(second.view(0, rows.nbytes).view("<f4").reshape(4, 8), rows)
    finally:
        second.close()
