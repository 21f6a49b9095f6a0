"""Shared fixtures: one real local Ray cluster per test session (ray.init costs seconds and
~600 MiB), and tables clusters of real shard actors serving gRPC on 127.0.0.1."""
import contextlib
import fcntl
import itertools
import shutil
import sysconfig
from pathlib import Path

import pytest

_names = itertools.count()


@contextlib.contextmanager
def suite_lock(tmp_path_factory, mode: int):
    """Holds the lock file shared by the run's pytest-xdist workers (in their temporary folders'
    parent) in `mode` (fcntl.LOCK_SH or LOCK_EX)."""
    with open(tmp_path_factory.getbasetemp().parent / "engram-suite.lock", "a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _not_beside_a_deployment(request, tmp_path_factory):
    """Every test holds the suite lock shared while it runs; the deployment tests hold it alone
    (tests/deploy/conftest.py), so nothing runs beside them on the other worker."""
    if "one_deployment_at_a_time" in request.fixturenames:
        yield
        return
    with suite_lock(tmp_path_factory, fcntl.LOCK_SH):
        yield


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from memory_service.ray_attach import init_local_ray

    started = init_local_ray()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def make_cluster(ray_session, tmp_path_factory):
    """Factory: make_cluster(num_shards, **ClusterConfig fields) -> a TableCluster, shut down at
    the end of the test module (a shard actor holds ~190 MiB and its background threads run
    until it stops: kept for the whole session, the suite's clusters filled memory and cores)."""
    import dataclasses

    from memory_service.cluster import ClusterConfig, launch
    from memory_service.config import StorageConfig

    clusters = []
    # tests save checkpoints in their tmp_path folders: the clusters' checkpoint root holds them all
    checkpoint_root = str(tmp_path_factory.getbasetemp())

    def make(num_shards: int, test_checkpoint_root: bool = True, **kwargs):
        """`test_checkpoint_root`: a storage without a checkpoint_root gets the session's tmp
        folder as its root (False: the cluster keeps its own default)."""
        storage = kwargs.get("storage", StorageConfig())
        if test_checkpoint_root and storage.checkpoint_root is None:
            kwargs["storage"] = dataclasses.replace(storage, checkpoint_root=checkpoint_root)
        cluster = launch(ClusterConfig(num_shards=num_shards, name=f"test{next(_names)}", **kwargs))
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.shutdown()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Twenty real stdlib modules copied into a folder: a corpus users would bring (read-only)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse", "json/decoder", "json/encoder", "textwrap", "string", "random", "heapq",
                 "bisect", "fractions", "functools", "contextlib", "dataclasses", "enum", "shlex",
                 "csv", "difflib", "glob", "fnmatch", "abc", "copy"]:
        shutil.copy(stdlib / f"{name}.py", root / f"{name.replace('/', '_')}.py")
    return root
