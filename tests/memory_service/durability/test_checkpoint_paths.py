"""Checkpoint paths (issue 22, finding 9): a shard writes and reads checkpoint files only under its
cluster's checkpoint root (default: `checkpoints/` under the cluster's storage path). A CheckpointSave
or CheckpointRestore naming a path outside it (`..`, another absolute path, a symlink pointing out) is
refused with INVALID_ARGUMENT before any file is written, and a save that fails leaves no shard
folder behind. Real Ray, gRPC over loopback, LMDB and files."""
import os

import grpc
import numpy as np
import pytest

from memory_service.config import StorageConfig, TableConfig
from memory_service.durability.checkpoint import restore_checkpoint, save_checkpoint
from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.rpc import memory_pb2

TABLE = TableConfig("paths/t", 1000, 4, init_scale=0.1)


@pytest.fixture(scope="module")
def shard(make_cluster, tmp_path_factory):
    """One LMDB shard (no checkpoint root configured: the default under its storage path) holding a
    table at step 1, its client, its checkpoint root and a folder outside that root."""
    base = tmp_path_factory.mktemp("paths")
    cluster = make_cluster(1, storage=StorageConfig(path=str(base / "lmdb")), test_checkpoint_root=False)
    root, outside = base / "lmdb" / "checkpoints", base / "outside"
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir()
    with cluster.client(shared_memory=False) as client:
        client.create_table(TABLE)
        ids = np.arange(0, 1000, 7)
        client.push({TABLE.name: (ids, np.ones((len(ids), 4), np.float32))}, step=1, lr=0.1)
        yield dict(client=client, root=root, outside=outside)


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs + _)


def save_rpc(client, path: str, step: int = 1):
    request = memory_pb2.CheckpointSaveRequest(path=path, step=step, tables=[], wait_seconds=0.2)
    return client.stubs[0].CheckpointSave(request, timeout=30)


@pytest.mark.parametrize("how", ["absolute outside", "dot-dot", "symlink out"])
def test_a_save_outside_the_root_is_refused_and_writes_nothing(shard, how):
    root, outside = shard["root"], shard["outside"]
    if how == "absolute outside":
        path = str(outside)
    elif how == "dot-dot":
        path = f"{root}/../../outside"
    else:
        link = root / "link-out"
        if not link.exists():
            link.symlink_to(outside, target_is_directory=True)
        path = str(link)
    with pytest.raises(grpc.RpcError) as err:
        save_rpc(shard["client"], path)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "checkpoint root" in err.value.details()
    assert files_under(outside) == []  # nothing written outside the root


def test_a_restore_from_outside_the_root_is_refused(shard):
    with pytest.raises(grpc.RpcError) as err:
        shard["client"].stubs[0].CheckpointRestore(
            memory_pb2.CheckpointRestoreRequest(path=f"{shard['root']}/../../outside"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_the_driver_refuses_a_checkpoint_outside_the_root_and_cleans_up(shard):
    """save_checkpoint to a folder outside the root: refused, and neither the checkpoint nor its
    temporary folder is left there."""
    with pytest.raises(InvalidArgument, match="checkpoint root"):
        save_checkpoint(shard["outside"] / "ck", shard["client"])
    assert files_under(shard["outside"]) == [] and list(shard["outside"].iterdir()) == []


def test_a_failed_save_leaves_no_shard_folder(shard):
    """A save the shard refuses after resolving its path (the table is not at the step) leaves no
    `shard-*` folder in the directory it was given."""
    target = shard["root"] / "not-a-checkpoint"
    target.mkdir()
    with pytest.raises(grpc.RpcError) as err:
        save_rpc(shard["client"], str(target), step=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert list(target.iterdir()) == []


def test_saves_inside_the_root_by_absolute_path_and_restore(shard, make_cluster, tmp_path):
    """The root works: a checkpoint saved in it (absolute path) restores onto a cluster of the same
    root, and a relative request path is resolved under the root."""
    path = shard["root"] / "step-1"
    manifest = save_checkpoint(path, shard["client"])
    assert manifest.tables[0].rows == len(np.arange(0, 1000, 7))
    (shard["root"] / "relative-ck").mkdir()
    reply = save_rpc(shard["client"], "relative-ck")  # a name: resolved under the root
    assert reply.files and (shard["root"] / "relative-ck" / "shard-0000-of-0001").is_dir()
    target = make_cluster(1, storage=StorageConfig(checkpoint_root=str(shard["root"])))
    with target.client(shared_memory=False) as client:
        restore_checkpoint(path, client)
        ids = np.arange(0, 1000, 7)
        assert np.array_equal(client.fetch({TABLE.name: ids})[TABLE.name],
                              shard["client"].fetch({TABLE.name: ids})[TABLE.name])


def test_an_all_dram_cluster_without_a_root_refuses_saves(make_cluster, tmp_path):
    cluster = make_cluster(1, test_checkpoint_root=False)
    with cluster.client(shared_memory=False) as client:
        with pytest.raises(FailedPrecondition, match="checkpoint_root"):
            save_checkpoint(tmp_path / "ck", client)
    assert list(tmp_path.iterdir()) == []
