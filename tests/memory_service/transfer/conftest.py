"""Two real shards served over gRPC on 127.0.0.1 for the transfer tests: shard 0 LMDB-backed with a
small DRAM budget (rows spill to disk), shard 1 all-DRAM; one pair per test module."""
from __future__ import annotations

import pytest

from memory_service.client import MemoryClient
from memory_service.config import StorageConfig
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(shards, servers): shard 0 of 2 with LMDB and a 64 KiB DRAM budget, shard 1 all-DRAM."""
    path = str(tmp_path_factory.mktemp("lmdb"))
    shards = [Shard(0, 2, StorageConfig(path=path, dram_budget_bytes=64 << 10)), Shard(1, 2)]
    servers = [serve(shard) for shard in shards]
    yield shards, servers
    for server in servers:
        server.stop(None)
    for shard in shards:
        shard.close()


@pytest.fixture
def client(served):
    with MemoryClient([server.address for server in served[1]]) as client:
        yield client
