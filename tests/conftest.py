"""Shared fixtures: one real local Ray cluster per test session (ray.init costs seconds and
~600 MiB), and tables clusters of real shard actors serving gRPC on 127.0.0.1."""
import itertools
import shutil
import sysconfig
from pathlib import Path

import pytest

_names = itertools.count()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from memory_service.ray_attach import init_local_ray

    started = init_local_ray()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def make_cluster(ray_session):
    """Factory: make_cluster(num_shards, **ClusterConfig fields) -> a TableCluster, shut down at
    the end of the test module (a shard actor holds ~190 MiB and its background threads run
    until it stops: kept for the whole session, the suite's clusters filled memory and cores)."""
    from memory_service.cluster import ClusterConfig, launch

    clusters = []

    def make(num_shards: int, **kwargs):
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
