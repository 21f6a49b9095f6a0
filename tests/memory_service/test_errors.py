"""Every gRPC status code has a named error class, the servicer sends each class as its own code,
and a real call that runs past its deadline raises the named class (DeadlineExceeded), not the base
MemoryServiceError."""
import time

import grpc
import numpy as np
import pytest

from memory_service import errors
from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig, TableConfig
from memory_service.errors import STATUS_ERRORS, DeadlineExceeded, MemoryServiceError, StepNotReached, error_of_status
from memory_service.server.servicer import serve, status_of
from memory_service.shard.shard import Shard


def test_every_status_code_has_a_class_of_its_own():
    codes = {code.name for code in grpc.StatusCode} - {"OK"}
    assert set(STATUS_ERRORS) == codes
    assert len(set(STATUS_ERRORS.values())) == len(codes)  # one class per code
    for name, cls in STATUS_ERRORS.items():
        assert cls is not MemoryServiceError and cls.status == name
        error = error_of_status(name, "details")
        assert type(error) is cls and str(error) == "details"
    assert type(error_of_status("NOT_A_CODE", "x")) is MemoryServiceError


@pytest.mark.parametrize("cls", [c for c in vars(errors).values()
                                 if isinstance(c, type) and issubclass(c, MemoryServiceError) and c.status])
def test_the_servicer_sends_each_error_as_the_code_the_client_maps_back(cls):
    code = status_of(cls("x"))
    assert code is not None and code.name == cls.status
    assert isinstance(error_of_status(code.name, "x"), STATUS_ERRORS[cls.status])
    assert issubclass(cls, STATUS_ERRORS[cls.status])  # StepNotReached arrives as its base DeadlineExceeded


def test_status_of_other_errors():
    assert status_of(ValueError("bad config")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(RuntimeError("a bug")) is None  # gRPC answers UNKNOWN
    assert status_of(errors.ClusterError("no node")) is None  # never on the wire


def test_a_call_past_its_deadline_raises_deadline_exceeded():
    """A fetch held for a step no push brings ends at the client's timeout as DeadlineExceeded (not an
    OSError, which disk-error handlers catch), promptly and without retries."""
    shard = Shard(shard_id=0, num_shards=1)
    server = serve(shard)
    try:
        with MemoryClient([server.address], timeout=0.3, shared_memory=False) as client:
            client.create_table(TableConfig("t", 100, 4, optimizer=OptimizerConfig("sgd")))
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                client.fetch({"t": np.arange(4)}, min_step=5)
            assert time.monotonic() - start < 5 and client.retries == 0
            assert not isinstance(caught.value, (OSError, StepNotReached))  # not a disk error either
    finally:
        server.stop(grace=None)
