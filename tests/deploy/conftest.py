"""The end-to-end deployment tests run alone: each starts a Ray head and several nodes in network
namespaces of its own, which on a 2-core machine is all it can take (beside a busy second worker its
Ray nodes timed out starting). When `make test` runs the suite on two workers (pytest-xdist), such a
module holds a lock file in the run's shared temporary folder exclusively, and every other test
holds it shared while it runs (tests/conftest.py), so the other worker pauses meanwhile."""
import fcntl

import pytest

from tests.conftest import suite_lock


@pytest.fixture(scope="module")
def one_deployment_at_a_time(tmp_path_factory):
    with suite_lock(tmp_path_factory, fcntl.LOCK_EX):
        yield
