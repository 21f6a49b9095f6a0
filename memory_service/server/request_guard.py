"""A request whose bytes are not a valid message is INVALID_ARGUMENT, not INTERNAL.

gRPC Python answers a request its deserializer cannot parse (random bytes, a truncated message, a
string field that is not UTF-8, as any non-Python client can send) with INTERNAL "Exception
deserializing request!", which reads as a bug in the shard. The admission layer (admission.py)
takes every request as bytes and parses it here: a parse failure is answered with
INVALID_ARGUMENT naming the message type and the parser's error, before any servicer code runs.
"""
from __future__ import annotations

from collections.abc import Callable

from memory_service.errors import status_details


class Unparsable(ValueError):
    """Request bytes their message type cannot parse; the message is the status details."""


def parse(deserializer: Callable[[bytes], object] | None, payload: bytes, method: str):
    """The request message of `payload` (the bytes themselves without a deserializer);
    Unparsable when the bytes are not a valid message."""
    try:
        return deserializer(payload) if deserializer is not None else payload
    except Exception as err:  # protobuf's DecodeError, or anything a parser raises
        raise Unparsable(status_details(f"{method}: the request is not a valid message: "
                                        f"{type(err).__name__}: {err}")) from None
