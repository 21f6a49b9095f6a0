"""A shard's shared-memory arena when shared memory runs out: the table goes on in private memory
(no SIGBUS, nothing lost) and same-host readers fall back to Fetch. Run in a child process whose
file-size limit plays a full /dev/shm (a container's is 64 MiB by default)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import resource, signal
    import numpy as np
    from memory_service.config import OptimizerConfig, TableConfig
    from memory_service.shard.shard import Shard
    from memory_service.tables import TablePush

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, as ENOSPC on a full tmpfs
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    shard = Shard(0, 1)
    shard.create_table(TableConfig(name="t", num_rows=100_000, width=64, optimizer=OptimizerConfig(kind="sgd", lr=1.0)))
    ids = np.arange(0, 100_000, 3)  # 33k rows x 64 fp32: 8.5 MB, past the 1 MiB limit
    before = shard.fetch({"t": ids})["t"]
    shard.push("c", {"t": TablePush(1, ids, np.ones((len(ids), 64), np.float32))})
    after = shard.fetch({"t": ids})["t"]
    assert np.array_equal(after, before - 1), "rows lost or wrong after the arena went private"
    table = shard.shared.tables["t"]
    assert table.disabled and table.header[9] == 1  # readers see it dropped: they Fetch
    shard.close()
    print("ok")
""")


def test_a_full_shared_memory_leaves_the_table_private_and_whole():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    assert "shared memory for same-host readers ran out" in done.stderr
