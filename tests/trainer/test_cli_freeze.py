"""`engram freeze`: freezes a table on served shards (real gRPC), prints its bytes a row."""
from __future__ import annotations

import numpy as np

from memory_service.client import MemoryClient
from memory_service.config import TableConfig
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush
from trainer.cli import main


def test_engram_freeze_quantizes_a_served_table(capsys):
    cfg = TableConfig("run/layer0/head0", 100, 160, dtype="bfloat16")
    shard = Shard(0, 1)
    shard.create_table(cfg)
    shard.push("t", {cfg.name: TablePush(1, np.arange(4), np.ones((4, 160), np.float32))})
    server = serve(shard)
    try:
        assert main(["freeze", "--targets", server.address, "--table", cfg.name, "--quantization", "int8"]) == 0
        assert "164 bytes a row on the wire (0.51x bf16)" in capsys.readouterr().out
        with MemoryClient([server.address]) as client:
            assert client.table(cfg.name).quantization == "int8"
            assert client.fetch({cfg.name: np.arange(8)})[cfg.name].shape == (8, 160)
    finally:
        server.stop(grace=None)
