"""RequestGuard: a request whose bytes are not a valid message is INVALID_ARGUMENT, not INTERNAL.

gRPC Python answers a request its deserializer cannot parse (random bytes, a truncated message, a
string field that is not UTF-8, as any non-Python client can send) with INTERNAL "Exception
deserializing request!", which reads as a bug in the shard. The guard wraps every method's
deserializer so that a parse failure becomes a marker, and the method's handler answers it with
INVALID_ARGUMENT naming the message type and the parser's error, before any servicer code runs.
"""
from __future__ import annotations

import grpc

from memory_service.errors import status_details


class _Unparsable:
    """What the guarded deserializer returns for bytes its message type cannot parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer):
    def deserialize(payload: bytes):
        try:
            return deserializer(payload) if deserializer is not None else payload
        except Exception as err:  # protobuf's DecodeError, or anything a parser raises
            return _Unparsable(err)
    return deserialize


def _refuse(context: grpc.ServicerContext, method: str, bad: _Unparsable) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_details(
        f"{method}: the request is not a valid message: {type(bad.error).__name__}: {bad.error}"))


def _checked_request(behavior, method: str):
    def call(request, context):
        if isinstance(request, _Unparsable):
            _refuse(context, method, request)
        return behavior(request, context)
    return call


def _checked_stream(behavior, method: str):
    def call(request_iterator, context):
        def requests():
            for request in request_iterator:
                if isinstance(request, _Unparsable):
                    _refuse(context, method, request)
                yield request
        return behavior(requests(), context)
    return call


class RequestGuard(grpc.ServerInterceptor):
    """Answers unparsable request bytes with INVALID_ARGUMENT on every method of the server."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        wrap = _checked_stream if handler.request_streaming else _checked_request
        return handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer),
            unary_unary=handler.unary_unary and wrap(handler.unary_unary, method),
            unary_stream=handler.unary_stream and wrap(handler.unary_stream, method),
            stream_unary=handler.stream_unary and wrap(handler.stream_unary, method),
            stream_stream=handler.stream_stream and wrap(handler.stream_stream, method))
