"""Errors of the table service. Each error of the wire names its gRPC status code (`status`, the
code's name), the servicer aborts with it and the client raises the class back from it
(`error_of_status`, the one map both the client's transport and the checkpoint driver use), so
callers see the same exception in-process and over the wire. Every status code but OK has a class
(a code the service never sends, such as UNIMPLEMENTED from a shard of an older version, still gets
a named error rather than a bare MemoryServiceError). Status codes travel by name: this module
stays free of grpc, as the lowest floor of the layout (`engram --help` imports it)."""

MAX_DETAILS_CHARS = 1000


def status_details(message: str) -> str:
    """`message` as a status carries it: ASCII (other characters escaped) and at most
    MAX_DETAILS_CHARS long. Errors quote request values (a table name, a path): unbounded, they
    would push the trailers past the client's 8 KiB metadata limit, and the client would see
    RESOURCE_EXHAUSTED instead of the status the shard meant."""
    text = message.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= MAX_DETAILS_CHARS else text[:MAX_DETAILS_CHARS - 14] + "... (truncated)"


class MemoryServiceError(Exception):
    """Base class: a request the service rejected without changing any state (except where a
    class says otherwise). `status`: the gRPC status code's name the error travels as (None:
    never sent over the wire)."""

    status: str | None = None


class InvalidArgument(MemoryServiceError, ValueError):
    """Bad ids, widths, dtypes or payloads (gRPC INVALID_ARGUMENT)."""

    status = "INVALID_ARGUMENT"


class TableNotFound(MemoryServiceError, KeyError):
    """The named table does not exist on this shard (gRPC NOT_FOUND)."""

    status = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class TableExists(MemoryServiceError):
    """A table of this name exists with a different config (gRPC ALREADY_EXISTS)."""

    status = "ALREADY_EXISTS"


class DeadlineExceeded(MemoryServiceError):
    """An rpc did not finish before its deadline (gRPC DEADLINE_EXCEEDED): the client's timeout
    passed, or the shard held a fetch for a step that did not come (StepNotReached, as the
    client sees it: both end at the rpc's deadline). Says nothing about state: a push may or may
    not have been applied (re-sending it with the same request id is safe). Not a TimeoutError:
    that is an OSError, and code that catches disk errors (a shard writing checkpoint files) must
    not take a step that did not come for one."""

    status = "DEADLINE_EXCEEDED"


class StepNotReached(DeadlineExceeded):
    """A fetch waited for a table step that no push brought before its deadline (gRPC
    DEADLINE_EXCEEDED; the client raises DeadlineExceeded, its base class)."""


class RowsMoved(MemoryServiceError):
    """A row of the request has its home on another shard now (gRPC ABORTED, "moved: <version>"):
    refresh the hot map and send it there."""

    status = "ABORTED"


class FailedPrecondition(MemoryServiceError):
    """The state does not allow the request now: a checkpoint of a step some table is not at, a
    restore onto shards that hold its tables already (gRPC FAILED_PRECONDITION)."""

    status = "FAILED_PRECONDITION"


class CheckpointCorrupt(MemoryServiceError):
    """A checkpoint that is incomplete or damaged: no manifest (a save that did not finish), a
    file missing, or a file whose sha256 differs from the manifest's (gRPC DATA_LOSS)."""

    status = "DATA_LOSS"


class ShardUnavailable(MemoryServiceError):
    """A shard stayed unreachable (gRPC UNAVAILABLE) for the client's whole retry deadline: it
    crashed and was not restarted (no restarts left; all-DRAM and hot shards are not restarted),
    or the network is down. Unlike the other errors this says nothing about state: a push may or
    may not have been applied (re-sending it with the same request id is safe)."""

    status = "UNAVAILABLE"


class RequestTooLarge(MemoryServiceError):
    """A request over the per-request limits: more row ids than wire.MAX_REQUEST_ROWS, or a reply
    larger than wire.MAX_REPLY_BYTES (gRPC RESOURCE_EXHAUSTED, as for an oversized message)."""

    status = "RESOURCE_EXHAUSTED"


class Overloaded(RequestTooLarge):
    """The shard has as many calls of this client, or in all, in flight (or held fetches
    waiting) as its admission bounds allow, or a request did not arrive in time (gRPC
    RESOURCE_EXHAUSTED, its details starting with PREFIX): retry later, or hold fewer fetches."""

    PREFIX = "overloaded:"


class LimitReached(RequestTooLarge):
    """A bound on what a shard keeps for its callers was reached: the data-parallel parts held
    for steps not complete yet, per shard or per client (StorageConfig.parts_max_bytes,
    parts_client_max_bytes), or the steps open at once (gRPC RESOURCE_EXHAUSTED; the client raises
    RequestTooLarge, its base class). Nothing was applied: complete (or let expire) the steps
    held first."""


class QuotaExceeded(LimitReached):
    """A request would store rows beyond its namespace's quota of rows or bytes (shard/quotas.py;
    gRPC RESOURCE_EXHAUSTED, the details starting with PREFIX and naming the namespace, the quota
    and its usage; the client raises it back). Nothing was applied."""

    PREFIX = "quota:"


class StepExpired(FailedPrecondition):
    """A part or commit of a data-parallel step whose parts the shard dropped: not every
    contributor's part or commit came within StorageConfig.parts_expiry_s of the first (gRPC
    FAILED_PRECONDITION; the client raises FailedPrecondition, its base class). The step was never
    applied on this shard; the trainer must redo it (or restore a checkpoint)."""


class Unauthenticated(MemoryServiceError):
    """The call carried no token, or one the shard does not accept (gRPC UNAUTHENTICATED)."""

    status = "UNAUTHENTICATED"


class PermissionDenied(MemoryServiceError):
    """A read token called a write rpc (gRPC PERMISSION_DENIED)."""

    status = "PERMISSION_DENIED"


class Cancelled(MemoryServiceError):
    """The rpc was cancelled (gRPC CANCELLED): the shard stopped with the call in flight. The
    client re-sends it like UNAVAILABLE (memory_service/wire/retry.py); this is what is left when
    no retry is allowed. Says nothing about state, as ShardUnavailable."""

    status = "CANCELLED"


class UnknownError(MemoryServiceError):
    """The shard failed in a way it did not map to a status (gRPC UNKNOWN: an exception the
    servicer did not expect), a bug; the message carries the exception. Says nothing about state."""

    status = "UNKNOWN"


class OutOfRange(MemoryServiceError):
    """gRPC OUT_OF_RANGE: the service sends none (ids out of range are INVALID_ARGUMENT); named
    so that every status has a class."""

    status = "OUT_OF_RANGE"


class Unimplemented(MemoryServiceError):
    """The shard does not serve this rpc (gRPC UNIMPLEMENTED): a client newer than its shards."""

    status = "UNIMPLEMENTED"


class InternalError(MemoryServiceError):
    """gRPC INTERNAL: gRPC itself broke an invariant (a message that does not parse, a failed
    stream). Says nothing about state."""

    status = "INTERNAL"


# The one status -> error map: the client's transport and the checkpoint driver raise from it.
STATUS_ERRORS: dict[str, type[MemoryServiceError]] = {cls.status: cls for cls in (
    Cancelled, UnknownError, InvalidArgument, DeadlineExceeded, TableNotFound, TableExists, PermissionDenied,
    RequestTooLarge, FailedPrecondition, RowsMoved, OutOfRange, Unimplemented, InternalError, ShardUnavailable,
    CheckpointCorrupt, Unauthenticated)}


def error_of_status(status: str, message: str) -> MemoryServiceError:
    """The error of a failed rpc: the class of gRPC status code `status` (its name, e.g.
    "DATA_LOSS": grpc.StatusCode.DATA_LOSS.name) with `message`."""
    if status == Overloaded.status and message.startswith(Overloaded.PREFIX):
        return Overloaded(message)
    if status == QuotaExceeded.status and message.startswith(QuotaExceeded.PREFIX):
        return QuotaExceeded(message)
    return STATUS_ERRORS.get(status, MemoryServiceError)(message)


class ClusterError(MemoryServiceError):
    """The Ray cluster cannot hold or reach the table cluster: no node offers the shard resource,
    or an actor did not come up before its deadline. The message says what is missing and how to
    fix it."""


class ClusterNotFound(ClusterError):
    """No table cluster (registry actor) of this name runs on the Ray cluster."""
