"""The budgets a request must fit: ids per request, bytes per reply, and how long a fetch may wait.

Counted from the messages' payload lengths before anything is decoded, so an oversized request is
refused (RequestTooLarge: gRPC RESOURCE_EXHAUSTED) before it costs the shard any work. The limits
themselves are the wire's (codec.MAX_REQUEST_ROWS, codec.MAX_REPLY_BYTES): the client splits its
batches by the same numbers.

The reply budget is what bounds a fetch's cost: 32 MiB of rows (codec.MAX_REPLY_BYTES), e.g. 128
rows of a 65536-wide fp32 table or 131072 rows of width 64. The costliest such fetch reads only
never-written rows, each computed from its seed (rows.py: 8M values took 2-2.5 s on this 2-core
machine under moderate load, up to ~8 s with 8 jobs on its cores; the shard's lock is held
meanwhile, so that is also how long it can delay another request). Its memory: the rows (1x the
reply) and, for a reply in the message, its encoded bytes, the message's copy, the serialised
message and gRPC's buffers: the shard's peak RSS grew by ~200 MiB (6x) for a 32 MiB reply with the
sync gRPC server and ~300 MiB (9.4x) with the grpc.aio server that replaced it, <= 12x stated; a reply through shared memory is written from the rows (<= 2x). Freed after the answer
(an all-DRAM shard's heap keeps the pages for its next requests: server/shard_process.py).
tests/memory_service/server/test_request_cost.py checks both against a real shard process. Before
(issue 22, finding 7) the budget was 256 MiB and the rows were computed in one pass: one allowed
fetch of 1024 new rows of width 65536 took 36 s and 3.7 GiB.
"""
from __future__ import annotations

from memory_service.errors import RequestTooLarge
from memory_service.wire import codec

# How long a held fetch (min_step) waits when its call set no deadline. Seconds, not minutes: a
# waiting fetch holds a place and a thread (admission.py), so a caller that needs longer sets its
# own deadline, or re-sends on StepNotReached as MemoryClient does (wire/fetch_round.py).
MAX_FETCH_WAIT_S = 30.0


def check_rows(messages, rpc: str) -> None:
    """RequestTooLarge when the messages' ids payloads hold more than codec.MAX_REQUEST_ROWS ids
    (counted from their lengths, before anything is decoded)."""
    num_ids = sum(len(msg.ids) for msg in messages) // 8
    if num_ids > codec.MAX_REQUEST_ROWS:
        raise RequestTooLarge(f"{rpc}: {num_ids} row ids in one request; at most {codec.MAX_REQUEST_ROWS} "
                              f"(split the batch, as MemoryClient does)")


def check_reply(nbytes: int, rpc: str) -> None:
    """RequestTooLarge when a reply would carry more than codec.MAX_REPLY_BYTES of rows
    (codec.MAX_EXPORT_BYTES of rows and state for the migrator's "export")."""
    limit = codec.MAX_EXPORT_BYTES if rpc == "export" else codec.MAX_REPLY_BYTES
    if nbytes > limit:
        raise RequestTooLarge(f"{rpc}: the reply would hold {nbytes} bytes of rows; at most "
                              f"{limit} per request (split the batch, as MemoryClient does)")


def wait_s(context, max_wait_s: float = MAX_FETCH_WAIT_S) -> float:
    """Seconds a held fetch may wait: until just before the rpc's deadline (so the caller hears
    why), at most `max_wait_s` (the server's bound, MAX_FETCH_WAIT_S by default)."""
    remaining = context.time_remaining()
    return max_wait_s if remaining is None else max(0.0, min(remaining - 0.05, max_wait_s))
