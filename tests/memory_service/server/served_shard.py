"""A real shard in its own process: `serve()` of a plain all-DRAM Shard behind real gRPC on
127.0.0.1, started with `python -c` under the malloc settings of an all-DRAM shard (SHARD_ENV). A crash of the shard (SIGBUS, out of memory) then shows as the
process dying rather than killing pytest, and the test can read the shard's own RSS from /proc.

The child creates the tables it is given, pushes one step of ones to ids 0..7 of each (so the
digest covers rows and optimizer state), prints its port, then answers lines on stdin:
"digest" -> Shard.digest(); anything else (or EOF) stops it."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import grpc

from memory_service.config import TableConfig
from memory_service.rpc import memory_pb2_grpc
from memory_service.server.shard_process import SHARD_ENV
from memory_service.wire import codec

_CHILD = r"""
import json, sys
import numpy as np
from memory_service.config import TableConfig
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.tables import TablePush

shard = Shard(0, 1)
for fields in json.loads(sys.argv[1]):
    cfg = TableConfig(**fields)
    shard.create_table(cfg)
    shard.push("setup", {cfg.name: TablePush(1, np.arange(8), np.ones((8, cfg.width), np.float32))})
server = serve(shard)
print(server.port, flush=True)
for line in sys.stdin:
    if line.strip() != "digest":
        break
    print(shard.digest(), flush=True)
server.stop(None)
"""


class ShardProcess:
    """The child process and a stub of its shard; use as a context manager."""

    def __init__(self, tables: list[TableConfig]):
        fields = [{k: v for k, v in dataclasses.asdict(cfg).items() if k != "optimizer"} for cfg in tables]
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(fields)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **SHARD_ENV})
        port = self.proc.stdout.readline().strip()
        if not port:
            self.proc.kill()
            raise RuntimeError(f"the shard process exited with {self.proc.wait()} before serving")
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address, options=codec.MESSAGE_OPTIONS)
        self.stub = memory_pb2_grpc.MemoryServiceStub(self.channel)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def digest(self) -> str:
        self.proc.stdin.write("digest\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def rss_anon(self) -> int:
        """The shard process's anonymous resident memory in bytes (/proc/<pid>/status RssAnon)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no RssAnon in /proc/{self.pid}/status")

    def __enter__(self) -> "ShardProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()
        if self.alive():
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
