"""The budgets a request must fit: ids per request, bytes per reply, and how long a fetch may wait.

Counted from the messages' payload lengths before anything is decoded, so an oversized request is
refused (RequestTooLarge: gRPC RESOURCE_EXHAUSTED) before it costs the shard any work. The limits
themselves are the wire's (codec.MAX_REQUEST_ROWS, codec.MAX_REPLY_BYTES): the client splits its
batches by the same numbers.
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
    """RequestTooLarge when a reply would carry more than codec.MAX_REPLY_BYTES of rows."""
    if nbytes > codec.MAX_REPLY_BYTES:
        raise RequestTooLarge(f"{rpc}: the reply would hold {nbytes} bytes of rows; at most "
                              f"{codec.MAX_REPLY_BYTES} per request (split the batch, as MemoryClient does)")


def wait_s(context, max_wait_s: float = MAX_FETCH_WAIT_S) -> float:
    """Seconds a held fetch may wait: until just before the rpc's deadline (so the caller hears
    why), at most `max_wait_s` (the server's bound, MAX_FETCH_WAIT_S by default)."""
    remaining = context.time_remaining()
    return max_wait_s if remaining is None else max(0.0, min(remaining - 0.05, max_wait_s))
