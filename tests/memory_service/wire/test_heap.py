"""heap.keep_message_buffers: glibc's thresholds set once per process, and left alone where glibc's
own environment variables chose them (checked in child processes: the settings are process-wide)."""
import os
import subprocess
import sys

import pytest

CHILD = "from memory_service.wire import heap; print(heap.keep_message_buffers(), heap.keep_message_buffers())"


def run_child(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="mallopt is glibc's")
def test_sets_the_thresholds_once_on_glibc():
    assert run_child() == "True True"


def test_leaves_them_to_glibcs_environment_variables():
    assert run_child(MALLOC_MMAP_THRESHOLD_="1073741824") == "False False"
