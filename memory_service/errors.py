"""Errors of the table service. Each maps to one gRPC status code in the servicer, and back to the
same class in the client, so callers see the same exception in-process and over the wire."""

MAX_DETAILS_CHARS = 1000


def status_details(message: str) -> str:
    """`message` as a status carries it: ASCII (other characters escaped) and at most
    MAX_DETAILS_CHARS long. Errors quote request values (a table name, a path): unbounded, they
    would push the trailers past the client's 8 KiB metadata limit, and the client would see
    RESOURCE_EXHAUSTED instead of the status the shard meant."""
    text = message.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= MAX_DETAILS_CHARS else text[:MAX_DETAILS_CHARS - 14] + "... (truncated)"


class MemoryServiceError(Exception):
    """Base class: a request the service rejected without changing any state."""


class InvalidArgument(MemoryServiceError, ValueError):
    """Bad ids, widths, dtypes or payloads (gRPC INVALID_ARGUMENT)."""


class TableNotFound(MemoryServiceError, KeyError):
    """The named table does not exist on this shard (gRPC NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class TableExists(MemoryServiceError):
    """A table of this name exists with a different config (gRPC ALREADY_EXISTS)."""


class StepNotReached(MemoryServiceError):
    """A fetch waited for a table step that no push brought before its deadline (gRPC
    DEADLINE_EXCEEDED)."""


class RowsMoved(MemoryServiceError):
    """A row of the request has its home on another shard now (gRPC ABORTED, "moved: <version>"):
    refresh the hot map and send it there."""


class FailedPrecondition(MemoryServiceError):
    """The state does not allow the request now: a checkpoint of a step some table is not at, a
    restore onto shards that hold its tables already (gRPC FAILED_PRECONDITION)."""


class CheckpointCorrupt(MemoryServiceError):
    """A checkpoint that is incomplete or damaged: no manifest (a save that did not finish), a
    file missing, or a file whose sha256 differs from the manifest's (gRPC DATA_LOSS)."""


class ShardUnavailable(MemoryServiceError):
    """A shard stayed unreachable (gRPC UNAVAILABLE) for the client's whole retry deadline: it
    crashed and was not restarted (no restarts left; all-DRAM and hot shards are not restarted),
    or the network is down. Unlike the other errors this says nothing about state: a push may or
    may not have been applied (re-sending it with the same request id is safe)."""


class RequestTooLarge(MemoryServiceError):
    """A request over the per-request limits: more row ids than wire.MAX_REQUEST_ROWS, or a reply
    larger than wire.MAX_REPLY_BYTES (gRPC RESOURCE_EXHAUSTED, as for an oversized message)."""


class Unauthenticated(MemoryServiceError):
    """The call carried no token, or one the shard does not accept (gRPC UNAUTHENTICATED)."""


class PermissionDenied(MemoryServiceError):
    """A read token called a write rpc (gRPC PERMISSION_DENIED)."""


class ClusterError(MemoryServiceError):
    """The Ray cluster cannot hold or reach the table cluster: no node offers the shard resource,
    or an actor did not come up before its deadline. The message says what is missing and how to
    fix it."""


class ClusterNotFound(ClusterError):
    """No table cluster (registry actor) of this name runs on the Ray cluster."""
