"""One deployment at a time: the end-to-end tests each start a Ray head and several nodes in network
namespaces of their own, which on a 2-core machine is all it can take; when `make test` runs the
suite on two workers (pytest-xdist), a lock file in the run's shared temporary folder keeps two such
test modules from running at once (the other worker waits, then goes on with the rest)."""
import fcntl

import pytest


@pytest.fixture(scope="module")
def one_deployment_at_a_time(tmp_path_factory):
    lock_path = tmp_path_factory.getbasetemp().parent / "engram-deploy-tests.lock"  # shared by the workers
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
